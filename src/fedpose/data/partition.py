"""Non-IID partitions of a training set over federated clients.

Every partitioner returns `list[list[int]]`: for each client, the sorted indices of its records.
Every record goes to exactly one client and no client is empty; when that is impossible the
partitioner raises ValueError saying why. All randomness comes from the given seed.

- iid: a seeded shuffle cut into near-equal shares.
- by_attribute: whole attribute values per client (synth-arm's four views -> four clients, in
  sorted value order). With fewer clients than values, values are dealt round-robin in sorted
  order (4 views over 2 clients: anterior+posterior, left+right); with more clients than values
  it raises, since a value would have to be split (use dirichlet for that).
- dirichlet: label skew. For each value of the attribute, its records are split over clients by
  proportions drawn from Dirichlet(alpha): small alpha gives clients few values, large alpha
  approaches iid. Two rules for clients the draw leaves (nearly) empty: by default the draw is
  kept and each empty client gets one record of the largest; with min_size > 0 the whole draw is
  repeated until every client has at least min_size records (flwr-datasets' rule), at most
  DIRICHLET_MAX_DRAWS times. The second conditions on balanced outcomes, so at the same alpha it
  is less skewed: results under the two rules do not compare.
- quantity_skew: client sizes from Dirichlet(alpha), at least one record each; contents iid.

Attributes are read from `record.attributes`, except two derived ones:
- "pose": a k-means cluster of the normalised joints (centred on their mean, divided by their
  RMS distance from it, unlabelled joints filled with the joint's mean over the set);
- "facing", for records without that attribute: their "view" if they have one, else the
  direction the person faces, from the left-right shoulder vector ("toward", "away", "profile",
  or "unknown" when a shoulder is unlabelled).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpose import seeding
from fedpose.config import Config, FedConfig, choice_problem
from fedpose.data.records import SKELETONS, PoseRecord, Skeleton
from fedpose.run_dir import claim, mark, write_file

PARTITIONS = ("iid", "attribute", "dirichlet", "quantity")  # the `fed.partition` names
# draws of the redraw rule before giving up (flwr-datasets' DirichletPartitioner gives up after 11)
DIRICHLET_MAX_DRAWS = 100
PARTITION_COMMAND = "data partition"  # the command its folders are recorded as made by


def partition_problem(method: str) -> str | None:
    """Why `fed.partition` names no partitioner (None when it does)."""
    return choice_problem("fed.partition", method, PARTITIONS)


DERIVED_ATTRIBUTES = ("pose", "facing")


# --- helpers ---------------------------------------------------------------------------------
def _check_counts(n_records: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if n_records < num_clients:
        raise ValueError(
            f"cannot give {num_clients} clients at least one record each: only {n_records} records"
        )


def _check_alpha(alpha: float, name: str = "alpha") -> None:
    if not alpha > 0:
        raise ValueError(f"Dirichlet {name} must be > 0, got {alpha}")


def _apportion(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total`, as close to shares * total as rounding allows
    (largest remainder; ties go to the lower index)."""
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(int)
    short = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


def _draw_dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    p = rng.dirichlet(np.full(k, alpha))
    if not np.isfinite(p).all() or p.sum() <= 0:
        # very small alpha can underflow every component: the limit is all mass on one client
        p = np.zeros(k)
        p[rng.integers(k)] = 1.0
    return p


def _fill_empty(parts: list[list[int]], rng: np.random.Generator) -> list[list[int]]:
    """Give each empty client one record from the currently largest client.

    A Dirichlet draw over few values often leaves clients empty; moving single records keeps the
    drawn skew almost intact, where redrawing until nobody is empty would bias it towards iid.
    """
    for k in range(len(parts)):
        if not parts[k]:
            donor = max(range(len(parts)), key=lambda j: (len(parts[j]), -j))
            parts[k].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return [sorted(p) for p in parts]


def _guess_skeleton(records: Sequence[PoseRecord]) -> Skeleton | None:
    counts = {r.num_joints for r in records}
    if len(counts) != 1:
        return None
    num_joints = counts.pop()
    matches = [s for s in SKELETONS.values() if s.num_joints == num_joints]
    return matches[0] if len(matches) == 1 else None


# --- derived attributes ----------------------------------------------------------------------
def normalized_poses(records: Sequence[PoseRecord]) -> np.ndarray:
    """(N, 2J) joints centred on their mean and scaled by their RMS size; unlabelled joints are
    filled with that joint's mean over the records where it is labelled."""
    if not records:
        return np.zeros((0, 0))
    num_joints = records[0].num_joints
    out = np.full((len(records), num_joints, 2), np.nan)
    for i, r in enumerate(records):
        if r.num_joints != num_joints:
            raise ValueError(f"record {i} has {r.num_joints} joints, the first has {num_joints}")
        vis = np.asarray(r.visibility) > 0
        if not vis.any():
            continue
        pts = np.asarray(r.joints, dtype=float)[vis]
        centred = pts - pts.mean(axis=0)
        size = float(np.sqrt((centred**2).sum(axis=1).mean()))
        out[i, vis] = centred / (size if size > 1e-6 else 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a joint never labelled: mean of nothing
        fill = np.nanmean(out, axis=0)
    fill = np.nan_to_num(fill)
    missing = np.isnan(out)
    out[missing] = np.broadcast_to(fill, out.shape)[missing]
    return out.reshape(len(records), -1)


def pose_clusters(records: Sequence[PoseRecord], k: int, seed: int) -> list[str]:
    """k-means clusters of the normalised poses, as labels "pose0" .. "pose{k-1}"."""
    from scipy.cluster.vq import kmeans2

    if k < 1 or len(records) < k:
        raise ValueError(f"cannot cluster {len(records)} records into {k} pose clusters")
    data = normalized_poses(records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an empty cluster is not an error here
        _, labels = kmeans2(data, k, minit="++", rng=np.random.default_rng(seed))
    return [f"pose{int(c)}" for c in labels]


def _facing_from_shoulders(record: PoseRecord, skeleton: Skeleton) -> str:
    names = skeleton.joints
    li, ri = names.index("l_shoulder"), names.index("r_shoulder")
    vis = np.asarray(record.visibility) > 0
    if not (vis[li] and vis[ri]):
        return "unknown"
    j = np.asarray(record.joints, dtype=float)
    # a person facing the camera has the right shoulder on the image's left
    dx = j[ri, 0] - j[li, 0]
    if (
        "l_hip" in names
        and "r_hip" in names
        and vis[names.index("l_hip")]
        and vis[names.index("r_hip")]
    ):
        hips = (j[names.index("l_hip")] + j[names.index("r_hip")]) / 2
        ref = float(np.linalg.norm((j[li] + j[ri]) / 2 - hips))
    else:
        pts = j[vis]
        ref = float(np.sqrt(((pts - pts.mean(axis=0)) ** 2).sum(axis=1).mean())) * 2
    # shoulders closer than about a third of the torso length: seen from the side
    if ref <= 0 or abs(dx) < 0.35 * ref:
        return "profile"
    return "toward" if dx < 0 else "away"


def record_labels(
    records: Sequence[PoseRecord],
    attr: str,
    *,
    num_clusters: int = 4,
    seed: int = 0,
    skeleton: Skeleton | None = None,
) -> list[str]:
    """One string label per record for `attr` (see the module doc for the derived ones)."""
    if attr == "pose":
        return pose_clusters(records, num_clusters, seed)
    labels = []
    for i, r in enumerate(records):
        value = r.attributes.get(attr)
        if value is None and attr == "facing":
            value = r.attributes.get("view")
            if value is None:
                skeleton = skeleton or _guess_skeleton(records)
                if skeleton is None or not {"l_shoulder", "r_shoulder"} <= set(skeleton.joints):
                    raise ValueError(
                        "attribute 'facing': the records have no facing or view "
                        "attribute and no l_shoulder/r_shoulder joints to derive it"
                    )
                value = _facing_from_shoulders(r, skeleton)
        if value is None:
            known = sorted(r.attributes) + list(DERIVED_ATTRIBUTES)
            raise ValueError(
                f"record {i} ({r.record_id or r.image}) has no attribute {attr!r}; "
                f"available: {', '.join(known)}"
            )
        labels.append(str(value))
    return labels


# --- partitioners ----------------------------------------------------------------------------
def iid(n_records: int, num_clients: int, seed: int) -> list[list[int]]:
    """A seeded shuffle cut into shares whose sizes differ by at most one."""
    _check_counts(n_records, num_clients)
    perm = np.random.default_rng(seed).permutation(n_records)
    return [sorted(int(i) for i in chunk) for chunk in np.array_split(perm, num_clients)]


def by_attribute(
    records: Sequence[PoseRecord],
    attr: str,
    num_clients: int,
    *,
    seed: int = 0,
    skeleton: Skeleton | None = None,
) -> list[list[int]]:
    """Whole attribute values per client, in sorted value order; with fewer clients than values,
    values are dealt round-robin. With a multiple m of the values' count as clients, each value's
    records are split into m seeded, equal subsets (value i → clients i·m … i·m + m − 1: views ×
    subsets). Other counts above the values' raise ValueError."""
    _check_counts(len(records), num_clients)
    labels = record_labels(records, attr, num_clusters=num_clients, seed=seed, skeleton=skeleton)
    values = sorted(set(labels))
    if len(values) < num_clients and num_clients % len(values) == 0:
        subsets = num_clients // len(values)
        rng = seeding.stream(seed, seeding.ATTRIBUTE_SUBSETS)
        parts: list[list[int]] = []
        for value in values:
            idx = rng.permutation([i for i, lab in enumerate(labels) if lab == value])
            parts += [sorted(int(i) for i in chunk) for chunk in np.array_split(idx, subsets)]
        return parts
    if len(values) < num_clients:
        raise ValueError(
            f"partition by attribute {attr!r} needs at least one value per client, or a "
            f"multiple of the values' count: {len(values)} values ({', '.join(values)}) for "
            f"{num_clients} clients; use fewer clients or the dirichlet partition"
        )
    client_of = {v: i % num_clients for i, v in enumerate(values)}
    parts = [[] for _ in range(num_clients)]
    for i, label in enumerate(labels):
        parts[client_of[label]].append(i)
    return parts


def dirichlet(
    records: Sequence[PoseRecord],
    attr: str,
    num_clients: int,
    alpha: float,
    seed: int,
    *,
    num_clusters: int | None = None,
    skeleton: Skeleton | None = None,
    min_size: int = 0,
) -> list[list[int]]:
    """Label skew: each attribute value's records are split by Dirichlet(alpha) proportions.

    num_clusters: k for attr="pose" (default: num_clients). min_size: 0 keeps the first draw
    and fills empty clients (see _fill_empty); > 0 redraws until every client has at least
    min_size records, raising ValueError after DIRICHLET_MAX_DRAWS draws.
    """
    _check_counts(len(records), num_clients)
    _check_alpha(alpha)
    if min_size < 0 or min_size * num_clients > len(records):
        raise ValueError(
            f"fed.dirichlet_min_size {min_size}: {num_clients} clients of at least {min_size} "
            f"records need {min_size * num_clients}; there are {len(records)}"
        )
    labels = record_labels(
        records, attr, num_clusters=num_clusters or num_clients, seed=seed, skeleton=skeleton
    )
    rng = seeding.stream(seed, seeding.DIRICHLET_PARTITION)
    for _ in range(DIRICHLET_MAX_DRAWS if min_size > 0 else 1):
        parts = _dirichlet_draw(labels, num_clients, alpha, rng)
        if min_size == 0:
            return _fill_empty(parts, rng)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(
        f"fed.dirichlet_min_size {min_size}: no Dirichlet({alpha:g}) draw in "
        f"{DIRICHLET_MAX_DRAWS} gave every one of {num_clients} clients {min_size} records "
        f"(the smallest had {min(len(p) for p in parts)}); lower it, raise fed.dirichlet_alpha "
        f"or use fed.dirichlet_min_size=0"
    )


def _dirichlet_draw(
    labels: Sequence[str], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for value in sorted(set(labels)):
        idx = rng.permutation([i for i, lab in enumerate(labels) if lab == value])
        counts = _apportion(_draw_dirichlet(rng, alpha, num_clients), len(idx))
        for k, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            parts[k].extend(int(i) for i in chunk)
    return parts


def quantity_skew(n_records: int, num_clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Client sizes from Dirichlet(alpha) with at least one record each; contents are iid."""
    _check_counts(n_records, num_clients)
    _check_alpha(alpha)
    rng = seeding.stream(seed, seeding.QUANTITY_PARTITION)
    sizes = 1 + _apportion(_draw_dirichlet(rng, alpha, num_clients), n_records - num_clients)
    perm = rng.permutation(n_records)
    return [sorted(int(i) for i in chunk) for chunk in np.split(perm, np.cumsum(sizes)[:-1])]


def partition(
    records: Sequence[PoseRecord],
    cfg_fed: FedConfig,
    seed: int,
    *,
    skeleton: Skeleton | None = None,
) -> list[list[int]]:
    """Dispatch on cfg_fed.partition: iid | attribute | dirichlet | quantity."""
    method, k = cfg_fed.partition, cfg_fed.num_clients
    if method == "iid":
        return iid(len(records), k, seed)
    if method == "attribute":
        return by_attribute(records, cfg_fed.partition_attr, k, seed=seed, skeleton=skeleton)
    if method == "dirichlet":
        return dirichlet(
            records,
            cfg_fed.partition_attr,
            k,
            cfg_fed.dirichlet_alpha,
            seed,
            skeleton=skeleton,
            min_size=cfg_fed.dirichlet_min_size,
        )
    if method == "quantity":
        return quantity_skew(len(records), k, cfg_fed.quantity_alpha, seed)
    raise ValueError(f"unknown fed.partition {method!r}; expected one of {', '.join(PARTITIONS)}")


def dirichlet_rule(fed: FedConfig) -> str:
    """How the Dirichlet partition treats small clients, in words a result can quote."""
    if fed.dirichlet_min_size > 0:
        return f"redrawn until every client has >= {fed.dirichlet_min_size} records"
    return "drawn once, empty clients given one record of the largest"


# --- statistics ------------------------------------------------------------------------------
def client_statistics(
    records: Sequence[PoseRecord],
    parts: Sequence[Sequence[int]],
    attrs: Sequence[str] = ("view", "posture"),
    labels: Mapping[str, Sequence[str]] | None = None,
) -> list[dict]:
    """Per client: {"client", "size", <attr>: {value: count}}.

    `labels` gives precomputed per-record labels (e.g. derived "pose" clusters) by name; they are
    reported before `attrs`. Attributes that no record has are left out (LSP has no views).
    """
    labels = dict(labels or {})
    names = list(labels) + [
        a for a in attrs if a not in labels and any(a in r.attributes for r in records)
    ]
    stats = []
    for k, idx in enumerate(parts):
        row: dict = {"client": k, "size": len(idx)}
        for name in names:
            if name in labels:
                values = [str(labels[name][i]) for i in idx]
            else:
                values = [str(records[i].attributes.get(name, "?")) for i in idx]
            row[name] = dict(sorted(Counter(values).items()))
        stats.append(row)
    return stats


def _attr_names(stats: Sequence[dict]) -> list[str]:
    return [key for key in (stats[0] if stats else {}) if key not in ("client", "size")]


def print_statistics(stats: Sequence[dict], console=None, title: str = "Clients") -> None:
    """A rich table: one row per client, its size and share, and value counts per attribute."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(emoji=False)
    total = sum(s["size"] for s in stats) or 1
    table = Table(title=title)
    table.add_column("client", justify="right")
    table.add_column("size", justify="right")
    table.add_column("share", justify="right")
    names = _attr_names(stats)
    for name in names:
        table.add_column(name)
    for s in stats:
        cells = [" ".join(f"{v}:{c}" for v, c in s[name].items()) for name in names]
        table.add_row(str(s["client"]), str(s["size"]), f"{s['size'] / total:.1%}", *cells)
    table.add_section()
    table.add_row("all", str(sum(s["size"] for s in stats)), "100.0%", *[""] * len(names))
    console.print(table)


def plot_statistics(stats: Sequence[dict], out_png: str | Path) -> Path:
    """Stacked bars per client, one panel per attribute (just sizes when there is none)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    names = _attr_names(stats) or ["size"]
    fig = Figure(figsize=(5.0 * len(names), 3.4), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    clients = [s["client"] for s in stats]
    for ax, name in zip(axes, names, strict=True):
        if name == "size":
            ax.bar(clients, [s["size"] for s in stats], color="tab:blue")
        else:
            values = sorted({v for s in stats for v in s[name]})
            cmap = colormaps["tab10" if len(values) <= 10 else "tab20"]
            bottom = np.zeros(len(stats))
            for j, value in enumerate(values):
                counts = np.array([s[name].get(value, 0) for s in stats], dtype=float)
                ax.bar(clients, counts, bottom=bottom, label=value, color=cmap(j % cmap.N))
                bottom += counts
            if len(values) <= 20:
                # outside the axes: a legend inside would hide the tallest bars
                ax.legend(
                    fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False
                )
        ax.set_title(name)
        ax.set_xlabel("client")
        ax.set_ylabel("records")
        ax.set_xticks(clients)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


# --- the partition report ------------------------------------------------------------------
def _write_partition(path: Path, header: dict, clients: list[dict]) -> None:
    # one line per client keeps a long index list readable and the file diffable
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()]
    body = ",\n".join(f"    {json.dumps(c)}" for c in clients)
    write_file(path, "{\n" + "\n".join(lines) + '\n  "clients": [\n' + body + "\n  ]\n}\n")


@dataclass
class PartitionReport:
    stats: list[dict]  # client_statistics of the partition
    title: str
    json_path: Path  # <run_dir>/partition.json: per-client statistics and record indices
    png_path: Path  # <run_dir>/partition.png: the statistics as bars


def write_partition_report(cfg: Config, force: bool = False) -> PartitionReport:
    """Partition the configured training split and save per-client statistics in the run
    directory (partition.json and partition.png), recorded as `data partition`'s: a folder
    another command made is refused unless `force`."""
    from fedpose.data import load_split  # looked up at call time, so a test can replace it

    records, skeleton = load_split(cfg.data, "train")
    fed = cfg.fed
    parts = partition(records, fed, cfg.seed, skeleton=skeleton)
    uses_attr = fed.partition in ("attribute", "dirichlet")
    labels = {}
    if uses_attr:
        labels[fed.partition_attr] = record_labels(
            records,
            fed.partition_attr,
            num_clusters=fed.num_clients,
            seed=cfg.seed,
            skeleton=skeleton,
        )

    stats = client_statistics(records, parts, labels=labels)
    title = f"{cfg.data.dataset}: {fed.partition} partition over {fed.num_clients} clients"
    if uses_attr:
        title += f" by {fed.partition_attr}"

    header = {
        "dataset": cfg.data.dataset,
        "partition": fed.partition,
        "num_clients": fed.num_clients,
        "seed": cfg.seed,
        "num_records": len(records),
    }
    if uses_attr:
        header["attr"] = fed.partition_attr
    if fed.partition == "dirichlet":
        header["alpha"] = fed.dirichlet_alpha
        header["dirichlet_rule"] = dirichlet_rule(fed)
    if fed.partition == "quantity":
        header["alpha"] = fed.quantity_alpha
    clients = [
        {
            **s,
            "indices": list(idx),
            "record_ids": [records[i].record_id or Path(records[i].image).name for i in idx],
        }
        for s, idx in zip(stats, parts, strict=True)
    ]
    run_dir = Path(cfg.run_dir)
    with claim(run_dir, cfg.out_dir, PARTITION_COMMAND, force=force):
        mark(run_dir, PARTITION_COMMAND)
        json_path = run_dir / "partition.json"
        _write_partition(json_path, header, clients)
        png_path = plot_statistics(stats, run_dir / "partition.png")
    return PartitionReport(stats, title, json_path, png_path)
