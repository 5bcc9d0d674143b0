"""Moving large files to a machine in call-sized pieces, each checked on arrival.

A lent GPU machine receives at most a few tens of MiB per call, and the models of the evaluation
are larger (Qwen2.5-Coder-1.5B's GGUF is 1.1 GB). ``split`` cuts files into pieces and packs the
pieces into numbered call folders of at most ``call_bytes`` each, with a ``manifest.json`` that
pins the sha256 of every piece and of every whole file. On the receiving side ``receive`` checks
each piece of a call folder against its manifest before keeping it (a corrupt transfer is refused
at once, not after the last piece), and joins every file whose pieces are all there, checking the
whole file's sha256 too. Pieces may arrive in any order and over several calls.

    python -m xattention.eval.pieces split --call-mib 56 --out .xfer model.gguf extras.tar.xz
    python -m xattention.eval.pieces receive .xfer/3 --store /tmp/in --dest /tmp/files
    python -m xattention.eval.pieces status --store /tmp/in
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["split", "receive", "missing_pieces", "sha256_file"]

MANIFEST = "manifest.json"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split(files: Sequence[str | Path], out: str | Path, call_bytes: int) -> dict[str, Any]:
    """Cut ``files`` into pieces packed into call folders ``out/1``, ``out/2``, ... of at most
    ``call_bytes`` each (the manifest beside them included); returns the manifest.

    Pieces are filled in the order the files are given, so small files given first travel in the
    first call. ``out`` is emptied first.
    """
    if isinstance(call_bytes, bool) or not isinstance(call_bytes, int) or call_bytes < 1 << 20:
        raise ValueError(f"call_bytes must be an int of at least 1 MiB, got {call_bytes!r}")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"files: {p} is not a file")
    if len({p.name for p in paths}) != len(paths):
        raise ValueError("files: two files share a name")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    budget = call_bytes - (64 << 10)  # room for the manifest that travels with every call
    manifest: dict[str, Any] = {"files": {}, "calls": [[]]}
    room = budget
    for path in paths:
        entry = {"size": path.stat().st_size, "sha256": sha256_file(path), "pieces": []}
        with path.open("rb") as f:
            index = offset = 0
            while True:  # an empty file still gets one (empty) piece
                if room == 0:
                    manifest["calls"].append([])
                    room = budget
                data = f.read(room)
                name = f"{path.name}.{index:03d}"
                folder = out / str(len(manifest["calls"]))
                folder.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
                entry["pieces"].append({"name": name, "size": len(data),
                                        "sha256": hashlib.sha256(data).hexdigest()})
                manifest["calls"][-1].append(name)
                room -= len(data)
                index += 1
                offset += len(data)
                if offset >= entry["size"]:
                    break
        manifest["files"][path.name] = entry
    text = json.dumps(manifest, indent=1)
    for call in range(1, len(manifest["calls"]) + 1):
        (out / str(call) / MANIFEST).write_text(text)
    return manifest


def receive(call_dir: str | Path, store: str | Path, dest: str | Path) -> list[Path]:
    """Check the pieces of one call folder, keep them in ``store``, and join into ``dest`` every
    file that is now complete. Returns the files joined by this call.

    A piece whose sha256 differs from the manifest raises ``ValueError`` and is not kept; so does
    a joined file whose sha256 differs (its pieces are then deleted, to be sent again).
    """
    call_dir, store, dest = Path(call_dir), Path(store), Path(dest)
    manifest = json.loads((call_dir / MANIFEST).read_text())
    store.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    kept = store / MANIFEST
    if kept.exists() and json.loads(kept.read_text()) != manifest:
        raise ValueError(f"{call_dir} belongs to another transport than the pieces in {store}")
    kept.write_text(json.dumps(manifest, indent=1))
    pieces = {p["name"]: p for entry in manifest["files"].values() for p in entry["pieces"]}
    for piece in sorted(call_dir.iterdir()):
        if piece.name == MANIFEST:
            continue
        if piece.name not in pieces:
            raise ValueError(f"{piece} is not in the manifest")
        got = sha256_file(piece)
        if got != pieces[piece.name]["sha256"]:
            raise ValueError(f"{piece} has sha256 {got}, expected "
                             f"{pieces[piece.name]['sha256']}: the transfer is corrupt")
        shutil.move(str(piece), store / piece.name)
    joined = []
    for name, entry in manifest["files"].items():
        target = dest / name
        if target.exists() and target.stat().st_size == entry["size"]:
            continue
        parts = [store / p["name"] for p in entry["pieces"]]
        if not all(p.exists() for p in parts):
            continue
        partial = target.with_name(target.name + ".partial")
        with partial.open("wb") as f:
            for p in parts:
                with p.open("rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
        got = sha256_file(partial)
        if got != entry["sha256"]:
            partial.unlink()
            for p in parts:
                p.unlink()
            raise ValueError(f"joined {name} has sha256 {got}, expected {entry['sha256']}")
        partial.replace(target)
        for p in parts:
            p.unlink()
        joined.append(target)
    return joined


def missing_pieces(store: str | Path, dest: str | Path | None = None) -> dict[str, list[int]]:
    """``{file: [call numbers still to send]}`` for the files not yet joined (into ``dest``)."""
    store = Path(store)
    if not (store / MANIFEST).exists():
        return {"(nothing received yet)": []}
    manifest = json.loads((store / MANIFEST).read_text())
    call_of = {name: i + 1 for i, names in enumerate(manifest["calls"]) for name in names}
    out = {}
    for name, entry in manifest["files"].items():
        if dest is not None and (Path(dest) / name).exists():
            continue
        calls = sorted({call_of[p["name"]] for p in entry["pieces"]
                        if not (store / p["name"]).exists()})
        if calls:
            out[name] = calls
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xattention.eval.pieces",
                                 description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="cut files into call folders")
    s.add_argument("files", nargs="+")
    s.add_argument("--out", required=True)
    s.add_argument("--call-mib", type=float, required=True, help="size of one call folder, MiB")
    r = sub.add_parser("receive", help="check and keep one call folder's pieces, join files")
    r.add_argument("call_dir")
    r.add_argument("--store", required=True)
    r.add_argument("--dest", required=True)
    st = sub.add_parser("status", help="which calls are still to send")
    st.add_argument("--store", required=True)
    st.add_argument("--dest", default=None)
    args = ap.parse_args(argv)
    if args.command == "split":
        manifest = split(args.files, args.out, int(args.call_mib * 2**20))
        print(f"{len(manifest['calls'])} calls under {args.out}")
    elif args.command == "receive":
        for path in receive(args.call_dir, args.store, args.dest):
            print(f"joined {path}")
        left = missing_pieces(args.store, args.dest)
        print("still to send: " + (json.dumps(left) if left else "nothing"))
    else:
        print(json.dumps(missing_pieces(args.store, args.dest)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
