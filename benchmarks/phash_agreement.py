"""clipline's pHash (area average, JPEGs decoded at reduced scale) against the Lanczos definition imagehash uses and
against the hash clipline used before (PIL draft decode + Lanczos): time per image, how far the hashes are apart,
and whether the near-duplicate thresholds keep their meaning.

    .venv/bin/python benchmarks/phash_agreement.py [--images 400] [--rounds 3]

Data: photo-like JPEGs (benchmarks/input_pipeline.picture), 300..700 px a side, resized to 256 px and center
cropped as prep writes them (the images prep hashes), and a second set of 200..900 px originals of any shape (the
images decontamination and prep.input_shards hash). Variants of each 256 px image: re-encoded at quality 30, halved
to 128 px, converted to PNG. Distinct pairs: each image against the next 40.

Printed and written to JSON: ms per 256 px image (best of --rounds, one thread), the mean and maximum Hamming
distance between definitions, and per definition the largest variant distance and the share of distinct pairs
within 4 and within 10 bits.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _bench import machine, write_result  # noqa: E402
from input_pipeline import picture  # noqa: E402

from data_prep.dedup import _DCT, _bits, hamming, phash_bytes  # noqa: E402


def _median_bits(low: np.ndarray) -> int:
    bits = (low > np.median(low)).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def lanczos_reference(data: bytes) -> int:
    """imagehash.phash: full decode, greyscale, Lanczos to 32 x 32, DCT-II, 8 x 8 against their median."""
    from scipy.fft import dct

    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((32, 32), Image.Resampling.LANCZOS),
                        dtype=np.float64)
    return _median_bits(dct(dct(pixels, axis=0), axis=1)[:8, :8])


def previous(data: bytes) -> int:
    """clipline's hash before 2026-12-03, as its code was: PIL draft decode to >= 64 px, greyscale, Lanczos to
    32 x 32, the low DCT rows as a matrix product, the median from a sort."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("L", (64, 64))
        pixels = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T).ravel()
    ranked = np.sort(low)
    return int.from_bytes(np.packbits(low > (ranked[31] + ranked[32]) / 2).tobytes(), "big")


def full_decode_area(data: bytes) -> int:
    """clipline's definition computed from the full-size decode (what the reduced-scale decode stands in for)."""
    grey = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    return _bits(grey, *grey.shape)


def _jpeg(a: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def _as_written(raw: bytes, side: int = 256) -> bytes:
    a = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    h, w = a.shape[:2]
    s = side / min(h, w)
    a = cv2.resize(a, (max(side, round(w * s)), max(side, round(h * s))), interpolation=cv2.INTER_AREA)
    h, w = a.shape[:2]
    y, x = (h - side) // 2, (w - side) // 2
    return _jpeg(a[y:y + side, x:x + side])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/phash_agreement.json"))
    a = p.parse_args()
    cv2.setNumThreads(1)
    rng = np.random.default_rng(1)
    written = [_as_written(picture(rng, int(rng.integers(300, 701)), int(rng.integers(300, 701))))
               for _ in range(a.images)]
    originals = [picture(rng, int(rng.integers(200, 901)), int(rng.integers(200, 901))) for _ in range(a.images)]
    definitions = {"clipline": phash_bytes, "imagehash (Lanczos)": lanczos_reference, "previous": previous}

    timing = {}
    for name in ("clipline", "previous"):
        best = float("inf")
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            for data in written:
                definitions[name](data)
            best = min(best, (time.perf_counter() - t0) / len(written) * 1e3)
        timing[name] = round(best, 4)

    hashes = {name: [f(d) for d in written] for name, f in definitions.items()}
    robustness = {}
    for name, f in definitions.items():
        worst, every = [], []
        for data, h in zip(written, hashes[name]):
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            variants = [_jpeg(img, 30), _jpeg(cv2.resize(img, (128, 128), interpolation=cv2.INTER_AREA)),
                        cv2.imencode(".png", img)[1].tobytes()]
            every += [hamming(h, f(v)) for v in variants]
            worst.append(max(every[-3:]))
        H = hashes[name]
        distinct = np.array([hamming(H[i], H[j]) for i in range(len(H)) for j in range(i + 1, min(i + 41, len(H)))])
        robustness[name] = {"variant_max_distance": int(max(worst)), "variant_mean": round(float(np.mean(every)), 3),
                            "variants_within_4": float(np.mean(np.array(worst) <= 4)),
                            "distinct_pairs_within_4": float(np.mean(distinct <= 4)),
                            "distinct_pairs_within_10": float(np.mean(distinct <= 10)),
                            "distinct_pairs": int(distinct.size)}

    def apart(x, y):
        d = np.array([hamming(u, v) for u, v in zip(x, y)])
        return {"mean": round(float(d.mean()), 3), "max": int(d.max())}

    agreement = {
        "256 px written: clipline vs imagehash (Lanczos)": apart(hashes["clipline"], hashes["imagehash (Lanczos)"]),
        "256 px written: previous vs imagehash (Lanczos)": apart(hashes["previous"], hashes["imagehash (Lanczos)"]),
        "256 px written: clipline vs previous": apart(hashes["clipline"], hashes["previous"]),
        "originals 200-900 px: reduced-scale vs full-size decode": apart([phash_bytes(d) for d in originals],
                                                                         [full_decode_area(d) for d in originals]),
        "originals 200-900 px: clipline vs imagehash (Lanczos)": apart([phash_bytes(d) for d in originals],
                                                                       [lanczos_reference(d) for d in originals]),
    }
    result = {"benchmark": "phash_agreement", "machine": machine(), "images": a.images, "rounds": a.rounds,
              "ms_per_256px_image_best_of_rounds": timing, "hamming_between_definitions": agreement,
              "robustness": robustness}
    write_result(a.out, result)
    print(f"ms per 256 px JPEG (best of {a.rounds}, one thread): clipline {timing['clipline']:.3f}, "
          f"previous {timing['previous']:.3f} ({timing['previous'] / timing['clipline']:.2f}x)")
    for k, v in agreement.items():
        print(f"  {k}: mean {v['mean']:.2f} bits, max {v['max']}")
    for k, v in robustness.items():
        print(f"  {k:20s} variants: mean {v['variant_mean']:.2f}, max {v['variant_max_distance']}, "
              f"within 4: {v['variants_within_4']:.3f}; distinct pairs within 4: {v['distinct_pairs_within_4']:.4f}, within 10: "
              f"{v['distinct_pairs_within_10']:.4f} (of {v['distinct_pairs']})")
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
