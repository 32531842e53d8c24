"""The `medpose` command line and the bundled run configs (launch/configs/*.yaml)."""
