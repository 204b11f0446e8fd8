"""Bit identity between two fedpose trees: the same short runs, the same numbers.

Runs 2-round tiny federations (4 clients, PoseResNet-18 at width 4, 48 generated synth-arm images)
of every registered strategy, six of them also in asynchronous mode, three under secure
aggregation, two with injected faults and two with partial participation, and writes one JSON
summary: per run, its metrics.jsonl rows less the wall-clock keys (`*_seconds`), the metadata of
model.safetensors less the commit it names (`fedpose_commit`) and the SHA-256 of each of its
weight tensors. Run it in each tree, then compare:

    PYTHONPATH=src OMP_NUM_THREADS=1 python tools/bit_identity.py before.json   # tree before
    PYTHONPATH=src OMP_NUM_THREADS=1 python tools/bit_identity.py after.json    # tree after
    python tools/bit_identity.py before.json --compare after.json   # exit 1 if any run differs

Both trees write their runs to the same folder (--out, emptied first), so that the model files'
metadata, which holds the config's paths, can be compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

MARKER = ".bit-identity"  # marks --out as this tool's own, the only folder it ever empties
SECRET = "0123456789abcdef0123456789abcdef"  # the sites' sketch secret (in-process only)


def runs() -> dict[str, tuple[str, ...]]:
    """Run name -> its config overrides on top of `tiny`."""
    from fedpose.fl.strategies import STRATEGY_NAMES

    out = {m: (f"fed.method={m}",) for m in STRATEGY_NAMES}
    out["fedavgm"] = ("fed.method=fedavgm", "fed.server_momentum=0.9")
    for m in ("fedavg", "feddyn", "fedbn", "scaffold", "fedgh", "fedadam"):
        out[f"{m}-async"] = (
            f"fed.method={m}",
            "fed.mode=async",
            "fed.concurrency=3",
            "fed.buffer_size=2",
            "system.speed_spread=10",
            "fed.rounds=3",
        )
    for m in ("fedavg", "fedgh", "feddyn"):
        out[f"{m}-secure"] = (f"fed.method={m}", "fed.secure=true", f"fed.sketch_secret={SECRET}")
    faults = ("system.faults=['exception','nan','wrong_shape','exploding_norm']",)
    for m in ("fedavg", "feddyn"):
        out[f"{m}-faults"] = (f"fed.method={m}", *faults, "system.fault_rate=0.4", "fed.rounds=3")
    for m in ("fedbn", "feddyn"):
        out[f"{m}-partial"] = (f"fed.method={m}", "fed.clients_per_round=2", "fed.rounds=3")
    return out


def tiny(out_dir: Path, data: Path, name: str, *overrides: str):
    # its own settings, not tests/fedtiny.py's: a recorded summary must stay comparable with a
    # later one when the tests' tiny federation changes (it now takes one local step, not two)
    from fedpose.config import load_config

    return load_config(
        None,
        [
            f"name={name}",
            f"out_dir={out_dir}",
            "data.dataset=synth-arm",
            f"data.root={data}",
            "data.synth_n=48",
            "data.synth_size=64",
            "data.input_size=32",
            "data.test_fraction=0.25",
            "model.depth=18",
            "model.width=4",
            "model.deconv_filters=8",
            "train.batch_size=8",
            "train.lr=0.01",
            "train.flip_test=false",
            "fed.rounds=2",
            "fed.num_clients=4",
            "fed.partition=attribute",
            "fed.partition_attr=view",
            "fed.local_steps=2",
            "fed.eval_every=1",
            *overrides,
        ],
    )


def summary(run_dir: Path) -> dict:
    """A run's metrics less wall-clock keys, its model file's metadata less the commit, and
    the digest of each weight tensor."""
    import torch
    from safetensors import safe_open

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in rows]
    model = run_dir / "model.safetensors"
    with safe_open(model, framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "fedpose_commit"}
        weights = {
            name: hashlib.sha256(
                f.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy()
            ).hexdigest()
            for name in sorted(f.keys())
        }
    return {"metrics": rows, "model_metadata": metadata, "weights": weights}


def record(result: Path, out_dir: Path, only: list[str]) -> None:
    import torch

    from fedpose.data.synth_arm import generate_synth_arm
    from fedpose.engine.runner import run_federation
    from fedpose.fl.observer import RunObserver

    torch.set_num_threads(1)
    # emptied only if this tool made it (its marker inside): never a folder someone else's
    if out_dir.exists():
        if not (out_dir / MARKER).is_file():
            print(f"error: {out_dir}: not made by this tool; give another --out", file=sys.stderr)
            raise SystemExit(2)
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / MARKER).write_text("made by tools/bit_identity.py; emptied by its next run\n")
    data = out_dir / "synth-arm"
    generate_synth_arm(data, n=48, seed=0, size=64, progress=False, workers=0)
    found = {}
    for name, overrides in runs().items():
        if only and name not in only:
            continue
        cfg = tiny(out_dir / "runs", data, name, *overrides)
        try:
            run_federation(cfg, observer=RunObserver())
            found[name] = summary(cfg.run_dir)
        except Exception as e:  # recorded, so that the other tree must fail the same way
            found[name] = {"error": f"{type(e).__name__}: {e}"}
        print(name, "error" if "error" in found[name] else "ok", flush=True)
    result.write_text(json.dumps(found, indent=1, sort_keys=True))


def compare(a_path: Path, b_path: Path) -> int:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    differ = sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))
    for name in differ:
        ra, rb = a.get(name, {}), b.get(name, {})
        keys = ("metrics", "model_metadata", "weights", "error")
        parts = [k for k in keys if ra.get(k) != rb.get(k)]
        print(f"{name}: {', '.join(parts)} differ")
    print(f"{len(a.keys() | b.keys())} runs, {len(differ)} differ")
    return 1 if differ else 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path, help="the JSON summary to write (or the first to compare)")
    p.add_argument("runs", nargs="*", help="only these runs (default: all)")
    p.add_argument("--compare", type=Path, metavar="OTHER", help="compare RESULT with OTHER")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("/tmp/fedpose-bit-identity"),
        help="the runs' folder: made by this tool, emptied by its next run (refused otherwise)",
    )
    args = p.parse_args(argv)
    if args.compare:
        return compare(args.result, args.compare)
    record(args.result, args.out, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
