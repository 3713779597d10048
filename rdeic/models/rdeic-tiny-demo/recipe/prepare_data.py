"""Real photographs that ship inside PyPI packages, split into training and held-out sets.

Training shards: scikit-image's colour photos and grey textures. Held out (never trained on):
scikit-image's ``chelsea`` and ``coffee`` and matplotlib's ``grace_hopper``; they become the
evaluation set and the README's example shards.

    python rdeic/models/rdeic-tiny-demo/recipe/prepare_data.py --out out/demo-data --examples examples/shards

With ``--debian-photos DIR`` the training shards also get the freely licensed photographs that
``photos.json`` lists, from Debian bookworm's desktop-background packages whose .deb files are in
DIR (``--download`` fetches them there first with ``apt-get download``, pinned to the listed
versions; run ``apt-get update`` once before). Each file is checked against its sha256 and
downscaled so that its longer side is at most 1024 px. The held-out set does not change.

    python rdeic/models/rdeic-tiny-demo/recipe/prepare_data.py --debian-photos out/debs --download
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

from PIL import Image, ImageOps

TRAIN = [  # (package, name, note)
    ("skimage", "astronaut.png", "NASA, public domain"),
    ("skimage", "rocket.jpg", "NASA, public domain"),
    ("skimage", "hubble_deep_field.jpg", "NASA/ESA, public domain"),
    ("skimage", "motorcycle_left.png", "Middlebury stereo, free for research"),
    ("skimage", "retina.jpg", "Häggström, CC0"),
    ("skimage", "ihc.png", "IHC stain, public domain"),
    ("skimage", "camera.png", "grey, public domain"),
    ("skimage", "brick.png", "grey texture, CC0"),
    ("skimage", "grass.png", "grey texture, CC0"),
    ("skimage", "gravel.png", "grey texture, CC0"),
    ("skimage", "coins.png", "grey, public domain"),
    ("skimage", "moon.png", "grey, public domain"),
]
HELD_OUT = [
    ("skimage", "chelsea.png", "Stefan van der Walt, CC0"),
    ("skimage", "coffee.png", "Rachel Michetti, CC0"),
    ("matplotlib", "grace_hopper.jpg", "US Navy, public domain"),
]


PHOTOS = Path(__file__).with_name("photos.json")
MAX_SIDE = 1024


def package_file(package: str, name: str) -> Path:
    if package == "skimage":
        import skimage

        return Path(skimage.__file__).parent / "data" / name
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


def write_shard(path: Path, samples: list[tuple[str, bytes, str, dict]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, data, ext, meta in samples:
            for suffix, payload in ((ext, data), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))


def sample(entry: tuple[str, str, str]) -> tuple[str, bytes, str, dict]:
    package, name, note = entry
    path = package_file(package, name)
    key = Path(name).stem
    return key, path.read_bytes(), path.suffix.lstrip("."), {"source": f"{package}:{name}", "license": note}


def deb_file(package: str, version: str) -> str:
    return f"{package}_{version.replace(':', '%3a')}_all.deb"  # the name apt-get download gives it


def download_debs(photos: list[dict], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pins = sorted({f"{p['package']}={p['version']}" for p in photos})
    subprocess.run(["apt-get", "download", *pins], cwd=dest, check=True)


def deb_files(deb: Path, wanted: set[str]) -> dict[str, bytes]:
    """The files named in ``wanted`` (paths without a leading ``./``) from a .deb's data archive.

    A .deb is an ar archive; reading it here spares the recipe a dependency on dpkg."""
    with deb.open("rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{deb} is not a .deb")
        while header := f.read(60):
            name, size = header[:16].decode().strip(), int(header[48:58])
            data = f.read(size + size % 2)
            if name.startswith("data.tar"):
                with tarfile.open(fileobj=io.BytesIO(data[:size])) as tar:
                    found = {m.name.removeprefix("./"): m for m in tar if m.isfile()}
                    return {n: tar.extractfile(found[n]).read() for n in wanted if n in found}
    raise ValueError(f"{deb} has no data archive")


def debian_samples(photos: list[dict], debs: Path) -> list[tuple[str, bytes, str, dict]]:
    samples = []
    for package, version in sorted({(p["package"], p["version"]) for p in photos}):
        listed = [p for p in photos if p["package"] == package]
        files = deb_files(debs / deb_file(package, version), {p["path"] for p in listed})
        for p in listed:
            data = files.get(p["path"])
            if data is None or hashlib.sha256(data).hexdigest() != p["sha256"]:
                raise ValueError(f"{package} {version}: {p['path']} is missing or differs from photos.json")
            im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
            scale = MAX_SIDE / max(im.size)
            if scale < 1:
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, "png")  # lossless: no second round of JPEG artefacts or chroma subsampling
            meta = {"source": f"debian:{package}={version}:{p['path']}"}
            meta |= {k: p[k] for k in ("license", "copyright", "note", "sha256") if k in p}
            samples.append((p["name"], buf.getvalue(), "png", meta))
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo-data")
    p.add_argument("--examples", default="examples/shards")
    p.add_argument("--debian-photos", metavar="DIR", help="also train on photos.json's photographs, from the .deb files in DIR")
    p.add_argument("--download", action="store_true", help="first apt-get download those .deb files into DIR")
    args = p.parse_args()
    if args.download and not args.debian_photos:
        p.error("--download needs --debian-photos DIR")
    out = Path(args.out)
    train = [sample(e) for e in TRAIN]
    if args.debian_photos:
        photos = json.loads(PHOTOS.read_text())["photos"]
        if args.download:
            download_debs(photos, Path(args.debian_photos))
        train += debian_samples(photos, Path(args.debian_photos))
    for i in range(0, len(train), 3):  # several shards so that two workers can split them
        write_shard(out / "train" / f"train-{i // 3:06d}.tar", train[i:i + 3])
    held = [sample(e) for e in HELD_OUT]
    write_shard(out / "val" / "val-000000.tar", held)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    for key, data, _, _ in held:
        Image.open(io.BytesIO(data)).convert("RGB").save(out / "eval" / f"{key}.png")  # lossless, for rdeic eval
    examples = Path(args.examples)
    write_shard(examples / "photos-000000.tar", held[:2])
    write_shard(examples / "photos-000001.tar", held[2:])
    print(f"{len(train)} training photos in {out / 'train'}, {len(held)} held out in {out / 'eval'} and {examples}")


if __name__ == "__main__":
    main()
