"""A hand-made pelvis shared by the X-ray geometry and task tests (definitions: engine/tasks/hip_xray/geometry.py)."""
import numpy as np


def hand_pelvis() -> np.ndarray:
    """H-line y = 100 from p3 (100, 100) to p7 (200, 100); u_h = (1, 0), u_p = (0, 1).
    Left roof p1 (60, 70) -> p3: AI_left = atan(30/40); right roof p9 (240, 80) -> p7: AI_right = atan(20/40).
    P-line origins o_l = (60, 100), o_r = (240, 100). h_l = (75, 130): x_l = -(75-60) = -15, y = 30 -> I.
    h_r = (250, 120): x = 10, y = 20 -> y > x -> II."""
    k = np.zeros((12, 2))
    k[0], k[1], k[2] = (60, 70), (80, 80), (100, 100)
    k[3], k[4], k[5] = (70, 120), (75, 125), (80, 140)
    k[6], k[7], k[8] = (200, 100), (220, 90), (240, 80)
    k[9], k[10], k[11] = (250, 110), (250, 115), (250, 130)
    return k
