"""SCHEME models under DistributedDataParallel and FSDP2, on CPU with gloo: two processes against one;
and `timm-scheme train` launched by torchrun.

One spawn of two processes runs every scenario (starting Python, torch and timm dominates the run time);
each test then compares what the ranks recorded with an independent single-process training on the whole
batch. DDP and FSDP average gradients over ranks, so two ranks on half the batch each, with a mean loss,
must train the same weights as one process on the whole batch.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from timm_scheme import scheme_patch
from timm_scheme import scheme_mixers

from .test_train import TINY

ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
STEPS = 4
GLOBAL_BATCH = 8
MODEL_KWARGS = dict(embed_dim=32, depth=2, num_heads=2, img_size=16, patch_size=4, num_classes=10)
SKIPPED_FROM_START = "blocks.0.mlp"  # 1 - alpha = 0.5 below a threshold of 0.9: CCA skipped in every step
SKIPPED_LATER = "blocks.1.mlp"  # CCA limit cut to 0.01 from this step on, below its threshold of 0.05
SKIP_FROM_STEP = 2
SCENARIOS = ("ddp", "ddp_skip", "fsdp", "fsdp_skip", "rank_check")
TIMEOUT_S = 240


# ------------------------------------------------------------------------------ the training, both ways

def _tiny_scheme_vit(skip: bool) -> torch.nn.Module:
    model = timm.create_model("vit_tiny_patch16_224", **MODEL_KWARGS)
    # annealed over the optimizer steps (half way by the end): every rank's clock must match the reference's
    scheme_patch(model, groups=4, expansion=4, cca=True, cca_anneal_steps=2 * STEPS, cca_anneal_start=0.0)
    mixers = scheme_mixers(model)
    mixers[SKIPPED_LATER].recompute_hidden = True  # the tiled autograd.Function, under DDP/FSDP as well
    if skip:
        mixers[SKIPPED_FROM_START].cca_skip_threshold = 0.9
        mixers[SKIPPED_LATER].cca_skip_threshold = 0.05
    return model


def _before_step(model: torch.nn.Module, step: int, skip: bool) -> None:
    if skip and step == SKIP_FROM_STEP:
        scheme_mixers(model)[SKIPPED_LATER].cca_limit.fill_(0.01)


def _skip_state(model: torch.nn.Module) -> dict:
    return {name: m._cca_skipped for name, m in scheme_mixers(model).items()}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from an FSDP2 DTensor shard (a collective: every rank calls it) or a tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _mix_logit_grads(model: torch.nn.Module) -> dict:
    return {name: _full(m.mix_logits.grad).detach().clone() if m.mix_logits.grad is not None else None
            for name, m in scheme_mixers(model).items()}


def _train(model: torch.nn.Module, inputs, targets, skip: bool, wrapped=None) -> dict:
    """STEPS of SGD with momentum through `wrapped` (DDP/FSDP, or the model itself): losses, skip decisions,
    mixing-logit gradients per step, and the final weights, read from the model under the wrapper."""
    wrapped = wrapped or model
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    record = dict(loss=[], skipped=[], mix_logit_grads=[])
    for step in range(STEPS):
        _before_step(model, step, skip)
        loss = F.cross_entropy(wrapped(inputs[step]), targets[step])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        record["mix_logit_grads"].append(_mix_logit_grads(model))
        optimizer.step()
        record["loss"].append(loss.item())
        record["skipped"].append(_skip_state(model))
    record["state"] = {k: _full(v).detach().clone() for k, v in model.state_dict().items()}
    return record


def _reference(inputs: dict, skip: bool) -> dict:
    """One process, the whole batch, no process group: what the distributed runs must reproduce."""
    model = _tiny_scheme_vit(skip)
    model.load_state_dict(inputs["init"])
    return _train(model, inputs["x"], inputs["y"], skip)


# ------------------------------------------------------------------------------------ the spawned ranks

def _wrap(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    if kind == "ddp":
        return DistributedDataParallel(model)  # deliberately without find_unused_parameters
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)  # in place: the model's parameters become DTensor shards


def _run_scenario(scenario: str, rank: int, inputs: dict) -> dict:
    if scenario == "rank_check":
        return _rank_check(rank, inputs)
    kind, skip = scenario.split("_")[0], scenario.endswith("_skip")
    model = _tiny_scheme_vit(skip)
    model.load_state_dict(inputs["init"])
    wrapped = _wrap(model, kind)
    half = GLOBAL_BATCH // WORLD_SIZE
    mine = slice(rank * half, (rank + 1) * half)
    return _train(model, [x[mine] for x in inputs["x"]], [y[mine] for y in inputs["y"]], skip, wrapped)


def _rank_check(rank: int, inputs: dict) -> dict:
    """`timm-scheme train`'s per-epoch check that the ranks mix and skip alike: silent while they do, and
    the error it raises once rank 1's CCA limit differs."""
    from timm_scheme.training.distributed import Processes, check_ranks_agree
    processes = Processes(rank=rank, world_size=WORLD_SIZE)
    model = _tiny_scheme_vit(skip=False)
    model.load_state_dict(inputs["init"])
    check_ranks_agree(model, processes)
    if rank == 1:
        scheme_mixers(model)[SKIPPED_LATER].cca_limit.fill_(0.5)
    try:
        check_ranks_agree(model, processes)
    except RuntimeError as err:
        return dict(disagreement=str(err))
    return dict(disagreement=None)


def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=60))
    try:
        inputs = torch.load(Path(folder) / "inputs.pt")
        for scenario in SCENARIOS:
            try:
                result = _run_scenario(scenario, rank, inputs)
            except Exception:  # recorded so the test of this scenario fails with it, and the others still run
                result = dict(error=traceback.format_exc())
            torch.save(result, Path(folder) / f"{scenario}_rank{rank}.pt")
        # leave together: rank 0 hosts the store, and tearing gloo down while the other rank still talks to
        # it aborted a rank at exit ("terminate called without an active exception") in one CI run of five
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(folder: Path) -> None:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks: one thread each on a shared CPU
        context = mp.start_processes(_worker, args=(_free_port(), str(folder)), nprocs=WORLD_SIZE,
                                     start_method="spawn", join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the {WORLD_SIZE} spawned ranks did not finish within {TIMEOUT_S}s")
    except mp.ProcessExitedException:
        # gloo's teardown has aborted a rank at exit ("terminate called without an active exception") after
        # the barrier, i.e. after every result was written; a rank that died before writing still fails here
        written = all((folder / f"{s}_rank{r}.pt").is_file() for s in SCENARIOS for r in range(WORLD_SIZE))
        if not written:
            raise


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """What the spawned ranks recorded, {(scenario, rank): record}, and the single-process reference
    trainings on the same initial weights and batches, {skip: record}."""
    folder = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    inputs = dict(init=_tiny_scheme_vit(skip=False).state_dict(),
                  x=[torch.randn(GLOBAL_BATCH, 3, 16, 16) for _ in range(STEPS)],
                  y=[torch.randint(0, 10, (GLOBAL_BATCH,)) for _ in range(STEPS)])
    torch.save(inputs, folder / "inputs.pt")
    _spawn(folder)
    ranks = {(s, r): torch.load(folder / f"{s}_rank{r}.pt") for s in SCENARIOS for r in range(WORLD_SIZE)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = {skip: _reference(inputs, skip) for skip in (False, True)}
    finally:
        torch.set_num_threads(threads)
    return dict(ranks=ranks, reference=reference, init=inputs["init"])


def _ranks_of(runs: dict, scenario: str) -> list:
    records = [runs["ranks"][(scenario, rank)] for rank in range(WORLD_SIZE)]
    for rank, record in enumerate(records):
        assert "error" not in record, f"{scenario} rank {rank} failed:\n{record['error']}"
    return records


def _assert_matches_reference(records: list, reference: dict, init: dict) -> None:
    """The mean of the ranks' half-batch losses is the whole-batch loss, and the final weights agree."""
    losses = torch.tensor([r["loss"] for r in records]).mean(0)
    torch.testing.assert_close(losses, torch.tensor(reference["loss"]), rtol=1e-5, atol=1e-5)
    for record in records:
        assert record["state"].keys() == reference["state"].keys()
        for name, expected in reference["state"].items():
            torch.testing.assert_close(record["state"][name], expected, rtol=1e-4, atol=1e-5, msg=name)
    # the steps moved the weights far more than the tolerance: a wrong gradient cannot hide in it
    assert max(float((reference["state"][k] - v).abs().max()) for k, v in init.items()
               if v.is_floating_point()) > 1e-2
    # the annealing clock counted every optimizer step once on every rank
    assert {int(v) for k, v in reference["state"].items() if k.endswith("cca_step")} == {STEPS}


def _assert_skipped_yet_learning(records: list, reference: dict) -> None:
    """The skipped layers really skipped CCA, and their mixing logits still learnt through alpha."""
    for record in (*records, reference):
        assert all(s[SKIPPED_FROM_START] for s in record["skipped"])
        assert [s[SKIPPED_LATER] for s in record["skipped"]] == [step >= SKIP_FROM_STEP for step in range(STEPS)]
        for grads in record["mix_logit_grads"]:
            for name in (SKIPPED_FROM_START, SKIPPED_LATER):
                assert grads[name] is not None and grads[name].abs().min() > 0, name
    for record in records:
        for grads, expected in zip(record["mix_logit_grads"], reference["mix_logit_grads"]):
            for name in (SKIPPED_FROM_START, SKIPPED_LATER):
                torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------------------------------ tests

def test_ddp_keeps_ranks_identical(runs):
    for scenario in ("ddp", "ddp_skip"):
        first, second = _ranks_of(runs, scenario)
        for name, tensor in first["state"].items():
            assert torch.equal(tensor, second["state"][name]), f"{scenario}: {name} differs between ranks"


def test_ddp_matches_single_process(runs):
    _assert_matches_reference(_ranks_of(runs, "ddp"), runs["reference"][False], runs["init"])


def test_ddp_with_cca_skipped_matches_single_process(runs):
    # no find_unused_parameters: a parameter left without a gradient would make DDP raise in the next step
    records = _ranks_of(runs, "ddp_skip")
    _assert_skipped_yet_learning(records, runs["reference"][True])
    _assert_matches_reference(records, runs["reference"][True], runs["init"])


def test_train_command_check_catches_ranks_that_drifted_apart(runs):
    for record in _ranks_of(runs, "rank_check"):
        assert f"1 SCHEME layer(s): {SKIPPED_LATER}." in (record["disagreement"] or "")


@pytest.mark.parametrize("scenario", ["fsdp", "fsdp_skip"])
def test_fsdp2_matches_single_process(runs, scenario):
    skip = scenario.endswith("_skip")
    records = _ranks_of(runs, scenario)
    if skip:
        _assert_skipped_yet_learning(records, runs["reference"][True])
    _assert_matches_reference(records, runs["reference"][skip], runs["init"])


# ---------------------------------------------------------------------------------- the train command

def test_resume_needs_the_same_process_count(tmp_path):
    from timm_scheme.training.run import _load_checkpoint
    torch.save(dict(epoch=1, args=dict(world_size=2)), tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit, match="written by a run of 2 process.*torchrun --nproc_per_node 2"):
        _load_checkpoint(str(tmp_path / "checkpoint.pth"), None, None, None, world_size=1)


def _torchrun(argv: list, timeout: float) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 ARGV` in a session of its own, so a hang kills the ranks too."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD_SIZE),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as launch:
        try:
            output, _ = launch.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)
            output, _ = launch.communicate()
            pytest.fail(f"torchrun did not finish within {timeout}s:\n{output[-3000:]}")
    return subprocess.CompletedProcess(command, launch.returncode, output)


def test_train_command_under_torchrun(tmp_path):
    out = tmp_path / "run"
    # 64 images per process and step: the global batch of test_train's single-process runs. Annealing with a
    # skip threshold makes both layers skip CCA during the run, under DDP without find_unused_parameters.
    result = _torchrun(["-m", "timm_scheme.cli", "train", *TINY, "--batch-size", "64", "--epochs", "2",
                        "--cca", "--cca-anneal-start", "0", "--cca-skip-threshold", "0.2",
                        "--output", str(out)], timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:]
    # rank 0 alone reports and writes: each message once, each file once
    for message in ("patched 2 MLPs", "epoch 1/2 ", "epoch 2/2 ", "exported to", "summary written to"):
        assert result.stdout.count(message) == 1, (message, result.stdout[-3000:])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pth", "export", "log.csv", "log.json",
                                                     "summary.json"]
    log = json.loads((out / "log.json").read_text())
    assert log["args"]["world_size"] == WORLD_SIZE and [e["epoch"] for e in log["epochs"]] == [1, 2]
    assert log["epochs"][-1]["cca_limit"] == 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verified"] and summary["cca_tensors_left"] == []
    # each epoch's top-1 is summed over the ranks' halves of the test set; rank 0 evaluates the fused model
    # on the whole of it, alone, and fusing is exact here
    assert summary["eval_images"] == 449 and summary["top1_fused"] == pytest.approx(log["epochs"][-1]["top1"])
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 2 and not any(k.startswith("module.") for k in checkpoint["model"])
    # each rank steps through its half of the 1,348 training images: 674 // 64 = 10 steps per epoch
    assert checkpoint["scheduler"]["t_initial"] == 2 * 10
