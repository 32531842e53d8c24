import pytest
import torch

from engine.dist import read_dist_info
from engine.strategies import build_strategy


def test_torchrun_variables():
    info = read_dist_info({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, use_cuda=False)
    assert (info.rank, info.local_rank, info.world_size, info.source) == (3, 1, 4, "torchrun")
    assert info.device == torch.device("cpu") and info.distributed and not info.is_main


def test_slurm_variables_without_torchrun():
    info = read_dist_info({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}, use_cuda=False)
    assert (info.rank, info.local_rank, info.world_size, info.source) == (5, 1, 8, "slurm")


def test_torchrun_wins_over_slurm_under_srun_plus_torchrun():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2"}
    info = read_dist_info(env, use_cuda=False)
    assert (info.rank, info.world_size, info.source) == (6, 8, "torchrun")


def test_no_launcher_is_a_single_process():
    info = read_dist_info({}, use_cuda=False)
    assert (info.rank, info.world_size, info.source, info.is_main) == (0, 1, "none", True)


def test_bad_values_name_the_variable():
    with pytest.raises(ValueError, match="RANK"):
        read_dist_info({"RANK": "x", "WORLD_SIZE": "2"}, use_cuda=False)
    with pytest.raises(ValueError, match="outside world size"):
        read_dist_info({"RANK": "2", "WORLD_SIZE": "2"}, use_cuda=False)


def test_strategy_by_name():
    single = read_dist_info({}, use_cuda=False)
    assert build_strategy("auto", single).name == "single"
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("horovod", single)
    multi = read_dist_info({"RANK": "0", "WORLD_SIZE": "2"}, use_cuda=False)
    with pytest.raises(ValueError, match="started 2 processes"):
        build_strategy("single", multi)
