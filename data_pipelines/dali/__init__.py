"""dali"""
