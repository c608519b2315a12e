"""The GPU path of training (``use_gpu``): what each setting decides, the early error without CUDA, and -- where a
GPU exists -- sharded against unsharded DeepFM on CUDA with NCCL and FBGEMM's fused kernels.

The decision tests plan on a CUDA ``Topology`` (TorchRec's planner is pure computation and needs no GPU), so they
run everywhere. ``test_sharded_deepfm_matches_unsharded_on_cuda`` needs a CUDA device and the CUDA build of
FBGEMM (``make setup GPU=1``); it is skipped elsewhere, and was not run when this file was written (no GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

from features.config import PlatformConfig, TrainConfig, load_config
from features.errors import DeviceUnavailableError

NO_CUDA = not torch.cuda.is_available()


def _deepfm_on_meta():
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from training.data import synthetic_vocab_sizes
    from training.models import DeepFM, DeepFMConfig

    model = DeepFM(synthetic_vocab_sizes(), DeepFMConfig(embedding_dim=8, hidden=(16, 8)),
                   sparse_device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, model.sparse_arch.parameters(), {"lr": 0.1})
    return model


def _kernels(plan) -> set[str]:
    return {ps.compute_kernel for module_plan in plan.plan.values() for ps in module_plan.values()}


# ------------------------------------------------------------------------------------------------- decisions
def test_backend_kernels_and_topology_per_device():
    from torchrec.distributed.planner.constants import DDR_CAP

    from training.distributed import compute_kernels, process_group_backend, topology

    assert (process_group_backend("cpu"), process_group_backend("cuda")) == ("gloo", "nccl")
    assert compute_kernels("cpu") is None and compute_kernels("cuda") == ["fused"]
    with pytest.raises(ValueError, match="compute device"):
        process_group_backend("tpu")

    budget = 512 * 2**20
    cpu, cpu_default, cuda = topology(2, "cpu", budget), topology(2, "cpu"), topology(2, "cuda", budget)
    assert (cpu.compute_device, cuda.compute_device) == ("cpu", "cuda")
    assert [d.storage.ddr for d in cpu.devices] == [budget, budget]  # the budget is host memory on CPU ...
    assert [d.storage.hbm for d in cpu.devices] == [0, 0]
    assert [d.storage.ddr for d in cpu_default.devices] == [DDR_CAP, DDR_CAP]  # (unchanged default without one)
    assert [d.storage.hbm for d in cuda.devices] == [budget, budget]  # ... and GPU memory on CUDA


def test_ray_train_configs_per_setting():
    from training.trainer import ray_train_configs

    scaling, torch_config = ray_train_configs(2, use_gpu=False)
    assert (scaling.num_workers, scaling.use_gpu, scaling.resources_per_worker) == (2, False, {"CPU": 1})
    assert torch_config.backend == "gloo"
    scaling, torch_config = ray_train_configs(4, use_gpu=True)
    assert (scaling.num_workers, scaling.use_gpu, scaling.resources_per_worker) == (4, True, {"CPU": 1, "GPU": 1})
    assert torch_config.backend == "nccl"


def test_use_gpu_flows_from_the_environment_to_the_scaling_config(monkeypatch):
    from training.trainer import ray_train_configs

    monkeypatch.setenv("RECSYS_TRAIN__USE_GPU", "true")
    monkeypatch.setenv("RECSYS_TRAIN__NUM_WORKERS", "3")
    cfg = load_config()
    assert cfg.train.use_gpu is True
    scaling, torch_config = ray_train_configs(cfg.train.num_workers, cfg.train.use_gpu)
    assert (scaling.num_workers, scaling.use_gpu, torch_config.backend) == (3, True, "nccl")
    monkeypatch.setenv("RECSYS_TRAIN__USE_GPU", "false")
    assert load_config().train.use_gpu is False


def test_planner_pins_fused_kernels_and_allows_row_wise_for_bags_on_cuda():
    from torchrec.distributed.planner.types import PlannerError

    from training.distributed import ShardingConfig, placements, plan_sharding

    table_wise = plan_sharding(_deepfm_on_meta(), 2, ShardingConfig(compute_device="cuda",
                                                                     memory_budget_bytes=2**30))
    assert _kernels(table_wise) == {"fused"}
    assert all(p.startswith("table_wise@") for p in placements(table_wise).values())

    # row-wise for an EmbeddingBagCollection: the planner refuses it on CPU, chooses it on CUDA
    with pytest.raises(Exception, match="No available sharding type"):
        plan_sharding(_deepfm_on_meta(), 2, ShardingConfig(sharding_types=("row_wise",)))
    rows = plan_sharding(_deepfm_on_meta(), 2, ShardingConfig(sharding_types=("row_wise",), compute_device="cuda",
                                                               memory_budget_bytes=2**30))
    assert set(placements(rows).values()) == {"row_wise@rank0,1"} and _kernels(rows) == {"fused"}

    # the hand-built row-wise plan places the shards on the ranks' GPUs
    hand = plan_sharding(_deepfm_on_meta(), 2, ShardingConfig(strategy="row_wise", compute_device="cuda"))
    assert _kernels(hand) == {"fused"}
    devices = {str(s.placement) for mp in hand.plan.values() for ps in mp.values() for s in ps.sharding_spec.shards}
    assert devices == {"rank:0/cuda:0", "rank:1/cuda:1"}, devices

    # FUSED only: a budget too small for the tables in GPU memory is refused, not moved to host memory (UVM)
    with pytest.raises(PlannerError):
        plan_sharding(_deepfm_on_meta(), 2, ShardingConfig(compute_device="cuda", memory_budget_bytes=2**10))


def test_cpu_worker_device():
    from training.trainer import worker_device

    assert worker_device(False) == torch.device("cpu")


def test_gpu_lock_is_the_cpu_lock_with_fbgemms_cuda_build():
    """``make setup GPU=1`` installs requirements/main-gpu.lock: the same pins as main.lock (torch 2.14.1 is the
    CUDA 13 build in both), with only FBGEMM's CPU build swapped for its CUDA build of the same version."""
    from features.config import ROOT

    cpu = (ROOT / "requirements/main.lock").read_text().splitlines()
    gpu = (ROOT / "requirements/main-gpu.lock").read_text().splitlines()
    changed = [(a, b) for a, b in zip(cpu, gpu) if a != b]
    version = next(line.split("==")[1] for line in cpu if line.startswith("fbgemm-gpu-cpu=="))
    assert len(cpu) == len(gpu) and changed == [(f"fbgemm-gpu-cpu=={version}", f"fbgemm-gpu=={version}")], changed


# ------------------------------------------------------------------------------------ no CUDA: a clear error
@pytest.mark.skipif(not NO_CUDA, reason="checks the error raised where no CUDA device is visible")
def test_use_gpu_without_cuda_fails_early_with_a_clear_error(tmp_path, monkeypatch):
    from training.distributed import require_cuda, topology
    from training.scale import ScaleOptions, run
    from training.train import TrainOptions, main, train
    from training.trainer import worker_device

    with pytest.raises(DeviceUnavailableError, match=r"torch.cuda.is_available\(\) is False") as e:
        require_cuda()
    assert "RECSYS_TRAIN__USE_GPU=false" in str(e.value)
    with pytest.raises(DeviceUnavailableError):
        worker_device(True)  # a Ray worker that landed without a GPU
    with pytest.raises(DeviceUnavailableError):
        topology(2, "cuda")  # no budget: it would need the device's memory
    # the driver fails before Ray starts and before it reads anything: this lake is empty, which would otherwise
    # raise TableNotFoundError
    cfg = PlatformConfig(data_dir=tmp_path, artifacts_dir=tmp_path, train=TrainConfig(use_gpu=True))
    with pytest.raises(DeviceUnavailableError):
        train(cfg, TrainOptions(model="deepfm"))
    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("RECSYS_TRAIN__RAY_ADDRESS", raising=False)  # the local cluster, on this machine
    with pytest.raises(DeviceUnavailableError):
        main(["--model", "deepfm", "--use-gpu"])
    monkeypatch.setenv("RECSYS_TRAIN__USE_GPU", "true")
    with pytest.raises(DeviceUnavailableError):
        main(["--model", "din"])
    with pytest.raises(DeviceUnavailableError):
        run(ScaleOptions(num_items=1000, embedding_dim=8, budget_mib=1), use_gpu=True)


# ----------------------------------------------------------------------------------- on a GPU: a real check
WORLD = min(2, torch.cuda.device_count()) if not NO_CUDA else 1
BATCH = 8  # rows per rank
LR = 0.5


def _rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    r = lambda hi: int(torch.randint(0, hi, (1,), generator=g))  # noqa: E731
    return [{"user_idx": r(30), "item_idx": r(40), "age_idx": r(8), "gender_idx": r(3), "occupation_idx": r(22),
             "zip_idx": r(12), "genre_idx": [r(20) for _ in range(r(4))]} for _ in range(n)]


def _worker(rank: int, world: int, port: int, device_type: str, strategy: str, types: tuple, done_dir: str) -> None:
    """One rank: sharded DeepFM on ``device_type`` (NCCL on CUDA) against the unsharded model on the CPU with the
    same weights -- logits, dense gradients, the fused SGD update of the tables -- and the gathered state loads into
    a CPU model."""
    import torch.distributed as dist

    from _spawn import mark_done
    from training.data import kjt_of_rows, synthetic_vocab_sizes
    from training.distributed import (ShardingConfig, gather_full_state_dict, load_full_state_dict, plan_sharding,
                                      process_group_backend, shard_model)
    from training.models import DeepFM, DeepFMConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(process_group_backend(device_type), rank=rank, world_size=world)
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    vocab, config = synthetic_vocab_sizes(), DeepFMConfig(embedding_dim=8, hidden=(16, 8), dropout=0.0)
    torch.manual_seed(0)
    reference = DeepFM(vocab, config)  # unsharded, on the CPU
    with torch.no_grad():
        for bag in reference.interaction_arch.first_order.weights.values():
            bag.weight.normal_(0, 0.1)
    rows = _rows(world * BATCH, seed=1)
    full_sd = {k: v.clone() for k, v in reference.state_dict().items()}

    sharded = DeepFM(vocab, config, sparse_device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, sharded.sparse_arch.parameters(), {"lr": LR})
    plan = plan_sharding(sharded, world, ShardingConfig(strategy=strategy, sharding_types=types,
                                                        compute_device=device_type))
    assert _kernels(plan) == {"fused"}
    dmp = shard_model(sharded, plan, device)
    load_full_state_dict(dmp, full_sd)
    for value in dmp.state_dict().values():
        for shard in getattr(value, "local_shards", lambda: [])():
            assert shard.tensor.device == device

    local = rows[rank * BATCH:(rank + 1) * BATCH]
    logits = dmp(kjt_of_rows(local).to(device))
    assert logits.device == device
    torch.testing.assert_close(logits.cpu(), reference(kjt_of_rows(local)), rtol=1e-4, atol=1e-5)

    logits.sum().backward()  # the tables' fused SGD steps inside backward
    reference(kjt_of_rows(rows)).sum().backward()
    dense_ref = dict(reference.named_parameters())
    for name, p in dmp.named_parameters():
        if "embedding_bags" in name or p.grad is None:
            continue
        key = name.replace("_dmp_wrapped_module.module.", "").replace("module.", "", 1) if name not in dense_ref \
            else name
        torch.testing.assert_close(p.grad.cpu(), dense_ref[key].grad / world, rtol=1e-4, atol=1e-5)
    gathered = gather_full_state_dict(dmp)
    if rank == 0:
        assert {t.device.type for t in gathered.values()} == {"cpu"}  # a GPU run's state loads on CPU
        for key, value in reference.state_dict().items():
            if "embedding_bags" in key:
                torch.testing.assert_close(gathered[key], value - LR * dense_ref[key].grad / world, rtol=1e-4,
                                           atol=1e-5)
        path = os.path.join(done_dir, "model.pt")
        torch.save(gathered, path)
        DeepFM(vocab, config).load_state_dict(torch.load(path, map_location="cpu"))
    dist.destroy_process_group()
    mark_done(done_dir, rank)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device and FBGEMM's CUDA build (make setup GPU=1)")
@pytest.mark.parametrize("strategy, types", [("planner", ("table_wise",)), ("planner", ("row_wise",)),
                                             ("row_wise", ("table_wise",))])
def test_sharded_deepfm_matches_unsharded_on_cuda(strategy, types, tmp_path):
    """On 2 GPUs (or 1: NCCL allows one rank per GPU), NCCL process group, fused CUDA kernels."""
    from _spawn import free_port, spawn_checked

    spawn_checked(_worker, (WORLD, free_port(), "cuda", strategy, types), WORLD, tmp_path)
