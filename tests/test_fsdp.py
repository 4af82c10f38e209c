"""Under FSDP2 (``fully_shard``) DoPr takes the steps one process takes on the concatenated batch.

Two gloo ranks on CPU, in float64: rank r trains on rows [4r, 4r + 4) of each 8-row batch with
its mean loss; the reference is one process (no process group) on all 8 rows with the mean loss.
FSDP2 shards every parameter and gradient by rows (dim 0) and averages gradients over ranks, so
the local gradient rows equal the reference's, DoPr all-reduces the activation statistics so
every rank preconditions with the global Σ, and ``M_local = G_local P`` is the reference's M on
the rank's rows. Parameters are gathered with ``full_tensor()`` after the steps and compared.

All the cases run in one spawned pair of processes (a module fixture).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_ranks import WORLD_SIZE, finish_rank, init_rank
from torch import nn

from beyondloss.optim import DoPr

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - torch without FSDP2
    pytest.skip("torch.distributed.fsdp.fully_shard is not available", allow_module_level=True)

BATCH = 8  # global rows per step; rank r takes [4r, 4r + 4)
STEPS = 5
ATOL = 1e-10  # fp64: only the summation order of the Σ all-reduce and FSDP's mean differ

EXACT = {"cov_every": 1, "inverse_every": 1, "ema_decay": 0.0}  # the per-batch formula
AMORTIZED = {"cov_every": 2, "inverse_every": 3, "ema_decay": 0.5}  # EMA, stale inverses
SCHEDULES: dict[str, dict[str, Any]] = {"exact": EXACT, "default": {}, "amortized": AMORTIZED}
BASES: dict[str, dict[str, Any]] = {
    "adamw": {"base": "adamw", "lr": 0.01, "weight_decay": 0.01},
    "sgd": {"base": "sgd", "momentum": 0.9, "lr": 0.05, "weight_decay": 0.01},
    "muon": {"base": "muon", "lr": 0.01, "weight_decay": 0.01},
}


def case(base: str, schedule: str, wrap: str, steps: int = STEPS, **extra: Any) -> dict:
    """One training run: model kind, FSDP wrapping (``per_layer`` + root, or ``root`` only)."""
    return {
        "model": extra.pop("model", "mlp"),
        "wrap": wrap,
        "steps": steps,
        "dopr": {**BASES[base], **SCHEDULES[schedule], **extra},
    }


PASSING: dict[str, dict] = {
    f"{base}-{schedule}-{wrap}": case(base, schedule, wrap)
    for base in ("adamw", "sgd")
    for schedule in SCHEDULES
    for wrap in ("per_layer", "root")
}
PASSING |= {
    f"{base}-{schedule}-blocks3-{wrap}": case(base, schedule, wrap, max_block_size=3)
    for base in ("adamw", "sgd")
    for schedule in ("exact", "amortized")
    for wrap in ("per_layer", "root")
}
# Muon: Newton–Schulz runs in bf16 on the gathered DTensor, so only one step is compared, and
# to a bf16-sized tolerance (its rounding is not reproduced bit for bit across the sharding).
MUON = {"muon-exact-per_layer": case("muon", "exact", "per_layer", steps=1)}
MUON_ATOL = 1e-6
PASSING |= MUON
# The clip of the preconditioned gradient takes the global norm (clip_grad_norm_ on DTensors);
# an FSDP2-sharded nn.Embedding is not preconditioned, so it is left to AdamW by name.
PASSING |= {
    f"{base}-exact-clip-per_layer": case(base, "exact", "per_layer", max_grad_norm=0.05)
    for base in ("adamw", "sgd")
}
PASSING["adamw-exact-embedding-excluded-per_layer"] = case(
    "adamw", "exact", "per_layer", model="embedding", exclude=["0"]
)

for base in ("adamw", "sgd"):
    PASSING[f"{base}-exact-grafting-per_layer"] = case(
        base, "exact", "per_layer", grafting="grad_norm"
    )
# A Linear with fewer output rows than ranks leaves rank 1 an empty (0, d_in) gradient shard.
PASSING["adamw-exact-1-output-head"] = case("adamw", "exact", "per_layer", model="head1")


# -- the model, the data and one training run (the same code in every process) ---------------


def make_model(kind: str) -> nn.Module:
    """The same fp64 initialization in every process; 5 and 7 rows split unevenly over 2 ranks."""
    torch.manual_seed(0)
    if kind == "mlp":
        layers = [nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)]
    elif kind == "head1":
        layers = [nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)]
    else:  # embedding
        layers = [nn.Embedding(7, 6), nn.Tanh(), nn.Linear(6, 4)]
    return nn.Sequential(*layers).double()


def make_batch(kind: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    if kind == "embedding":
        x = torch.randint(7, (BATCH,), generator=generator)
    else:
        x = torch.randn(BATCH, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(BATCH, 1 if kind == "head1" else 4, generator=generator, dtype=torch.float64)
    return x, y


def train(model: nn.Module, spec: dict, rows: slice) -> DoPr:
    opt = DoPr(model, **spec["dopr"])
    for step in range(spec["steps"]):
        x, y = make_batch(spec["model"], step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()
    return opt


def result(model: nn.Module, opt: DoPr) -> dict[str, Any]:
    """Full parameters (gathered from the shards) and every layer's Σ blocks."""
    full = {
        name: getattr(p, "full_tensor", p.detach)().detach().clone()
        for name, p in model.named_parameters()
    }
    sigma = {
        name: [block.clone() for block in s.sigma] for name, s in opt.preconditioner.layers.items()
    }
    return {"params": full, "sigma": sigma}


def worker(rank: int, cases: dict[str, dict], init_file: str, out_dir: str) -> None:
    init_rank(rank, init_file)
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        rows = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        results = {}
        for name, spec in cases.items():
            model = make_model(spec["model"])
            if spec["wrap"] == "per_layer":
                for layer in model:
                    if isinstance(layer, nn.Linear | nn.Embedding):
                        fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = train(model, spec, rows)
            results[name] = result(model, opt)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    except Exception:
        (Path(out_dir) / f"error{rank}.txt").write_text(traceback.format_exc())
        dist.destroy_process_group()
        raise
    finish_rank()


def run_fsdp(cases: dict[str, dict], out_dir: Path) -> list[dict[str, Any]]:
    """Train ``cases`` on 2 FSDP2 ranks; each rank's results, loaded in this process."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(cases, str(out_dir / "init"), str(out_dir)), nprocs=WORLD_SIZE)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def reference(spec: dict) -> dict[str, Any]:
    """One process (no process group), all rows of each batch, mean loss."""
    model = make_model(spec["model"])
    return result(model, train(model, spec, slice(None)))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


# -- the tests -----------------------------------------------------------------------------


SHARED = PASSING


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_fsdp(SHARED, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("name", list(PASSING))
def test_fsdp2_matches_one_process_on_the_concatenated_batch(
    name: str, fsdp_results: list[dict[str, Any]]
) -> None:
    spec = SHARED[name]
    single = reference(spec)
    atol = MUON_ATOL if name in MUON else ATOL
    ranks = [r[name] for r in fsdp_results]
    assert ranks[0]["params"].keys() == single["params"].keys()
    for key, value in single["params"].items():
        assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key]), key
        assert ranks[0]["params"][key].shape == value.shape, key
    assert max_difference(ranks[0]["params"], single["params"]) <= atol
    # Every rank preconditions with the global Σ (all-reduced statistics of all 8 rows).
    assert single["sigma"].keys() == ({"2"} if spec["dopr"].get("exclude") else {"0", "2"})
    for rank in ranks:
        assert rank["sigma"].keys() == single["sigma"].keys()
        for layer, blocks in single["sigma"].items():
            assert len(rank["sigma"][layer]) == len(blocks), layer
            for got, want in zip(rank["sigma"][layer], blocks, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    # The parameters moved: the comparison is not between two untouched initializations.
    initial = dict(make_model(spec["model"]).named_parameters())
    assert max_difference(single["params"], {k: p.detach() for k, p in initial.items()}) > 1e-4


def test_block_diagonal_sigma_has_blocks_of_at_most_three(
    fsdp_results: list[dict[str, Any]],
) -> None:
    sigma = fsdp_results[0]["adamw-exact-blocks3-per_layer"]["sigma"]
    assert [b.shape[0] for b in sigma["0"]] == [3, 3, 1]  # d_in 6 + bias
    assert [b.shape[0] for b in sigma["2"]] == [3, 3]  # d_in 5 + bias


def test_fsdp2_sharded_embedding_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    """FSDP2 shards an embedding's vocabulary; its diagonal P is not applied to a shard."""
    spec = case("adamw", "exact", "per_layer", model="embedding")
    with pytest.raises(mp.ProcessRaisedException, match="sharded .FSDP2. nn.Embedding"):
        run_fsdp({"embedding": spec}, tmp_path)
