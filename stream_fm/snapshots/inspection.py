"""``stream-fm inspect``: a snapshot root's snapshots checked one by one, the newest valid summarised
(its settings, offsets, calibration and the features with the largest weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from stream_fm.errors import StreamFMError
from stream_fm.model import _kernels
from stream_fm.model.keyindex import decode_keys
from stream_fm.model.state import upgrade_bias
from stream_fm.snapshots import snapshot

__all__ = ["inspect"]


def inspect(path: Path, top: int) -> int:
    """Check every snapshot under ``path`` (or the one at ``path``) and summarise the newest valid
    one; 1 if any failed its checks."""
    if (path / snapshot.MANIFEST).exists():
        names, root = [path.name], path.parent
    else:
        names, root = [name for _, name in snapshot.list_snapshots(path)], path
        if not names:
            print(f"{path}: no snapshots", file=sys.stderr)
            return 1
        print(f"root {path}: {len(names)} snapshot(s), LATEST -> {snapshot.latest_name(path)}")
    newest_valid = None
    failed = 0
    for name in names:
        try:
            snap = snapshot.read(root / name)
        except StreamFMError as e:
            failed += 1
            print(f"  FAILED  {name}: {e}")
            continue
        print(f"  ok      {name}  ({snap.manifest['samples_seen']:,} samples)")
        newest_valid = snap
    if newest_valid is not None:
        _summary(newest_valid, top)
    return 1 if failed else 0


def _summary(snap: snapshot.Snapshot, top: int) -> None:
    m = snap.manifest
    size = sum(f["size"] for f in m["files"].values())
    print(f"\n{snap.name}")
    print(f"  created_at    {m['created_at']}   sequence {m['sequence']}   format {m['format_version']}")
    print(f"  samples_seen  {m['samples_seen']:,}   n_features {m['n_features']:,}   {size / 1e6:,.1f} MB")
    print(f"  model         {m['model']['config']}")
    print(f"  offsets       {m['offsets'] or '{}'}")
    cluster = m["extra"].get("cluster")
    if cluster:  # a cluster member's: the offsets are the next rounds' starts
        print(
            f"  cluster       sync topic {cluster['sync_topic']!r}, {cluster['merged']} rounds folded, "
            f"replays from offset {cluster['sync_offset']}"
        )
    a = snap.model_arrays
    trained = np.flatnonzero(np.asarray(a["last"]) >= 0)
    if "key_bytes" in a:
        keys = decode_keys(a["key_bytes"], a["key_offsets"])
    else:
        keys = [f"<bucket {r}>" for r in range(len(a["w"]))]
    bias = upgrade_bias(a["bias"], m["model"]["state_format"])
    print(f"  w0            {bias[_kernels.B_W0]:+.6f}   reported {bias[_kernels.B_W0_REPORT]:+.6f}")
    gains = bias[_kernels.B_GAIN0 : _kernels.B_P]
    print("  calibration   w0 x{:.4f}  linear x{:.4f}  pairwise x{:.4f}  offset {:+.4f}".format(*gains))
    means = bias[[_kernels.B_LIN_MEAN, _kernels.B_PAIR_MEAN]]
    print("  part means    linear {:+.4f}  pairwise {:+.4f}".format(*means))
    for title, score in (
        ("|w|", np.abs(np.asarray(a["w"]))),
        ("||v||", np.linalg.norm(np.asarray(a["V"]), axis=1)),
    ):
        best = trained[np.argsort(-score[trained], kind="stable")[:top]]
        print(f"  top {len(best)} by {title}:")
        for r in best:
            print(f"    {score[r]:10.6f}  w={float(a['w'][r]):+.6f}  {keys[r]!r}")
