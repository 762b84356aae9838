"""Throughput and peak memory of `clipforge filter` (`pipeline.filter.filter_dataset`) on a synthetic dataset.

    python bench/filter_throughput.py                         # 100,000 samples, `tiny` model (~15-30 min on 2 cores)
    python bench/filter_throughput.py --samples 5000 --samples-per-shard 1000 --workdir /tmp/bench-filter-small
    python bench/filter_throughput.py --no-model              # rules and perceptual-hash duplicates only
    python bench/filter_throughput.py --exact-search-limit 1000  # force faiss HNSW at a small --samples

The dataset is built once and cached under `--workdir` (`data-<samples>x<per shard>-seed<seed>/`), in the layout
`clipforge ingest` writes: tar shards of `<key>.jpg` + `<key>.txt`, and `manifest.parquet`. Images are 64x64 JPEGs
(quality 90) of 4x4 random coloured 16-pixel blocks, distinct per sample. Planted for the rules to find: 5 % exact
byte copies and 5 % re-encoded copies (decoded, saved again at quality 75) of earlier samples, each with its
original's caption (the duplicate rule only pairs images whose captions match); 1 % 12x12 images (too_small), 1 %
64x16 images (aspect_ratio), 1 % one-word captions (too_few_words). The duplicate pairs found (from removed.parquet)
are counted against the planted ones; a copy whose partner the CLIP-score rule removed first cannot be found.
(Finer images, 8x8 blocks of 8 px, were dropped: their re-encodings, even at quality 85, move the 768-bit hash by
20-40 bits, beyond duplicate_hash_distance=8, so almost none of them were found.)

The filter runs into a fresh `--workdir/out/` with the basic rules (min_words=2, min_image_size=16,
max_aspect_ratio=3) and duplicate_hash_distance=8; with a model (default; `--no-model` skips it) also
duplicate_similarity=0.95 and clip_score_top_fraction=0.9, the model being a randomly initialised clipforge model of
`--preset` with a tokenizer trained on the captions, wrapped in `evaluation.filtering.ModelEmbedder`. A random
model's CLIP scores and embedding duplicates mean nothing; the time they take does not depend on the weights.

It runs in a fresh child process (this script with `--child`) that only builds the model and runs the filter, so that
dataset generation counts neither in the time nor in the memory. Peak memory is the child's `VmHWM` (peak resident
set of its own address space, KiB), not `ru_maxrss`: Linux carries the peak RSS of the process that exec'd a child
into that child's ru_maxrss, so `RUSAGE_CHILDREN` would report this parent's peak if it were the larger. Time per
pass comes from timers wrapped around `pipeline.filter`'s own functions in the child (scan = `scan_shard`, embedding
calls inside it; decide = `decide`, faiss searches inside it; write = `_copy_kept`); "other" is the rest of the wall
time (parquet reads and writes, shard offsets, the manifest). Prints a readable summary, then one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pipeline.manifest import IngestSummary, ShardInfo, tar_sample_offsets, write_manifest  # noqa: E402
from training.device import cpu_name  # noqa: E402

# kinds of planted samples (everything not listed is a plain 64x64 original), with their fractions
PLAIN, EXACT_COPY, REENCODED_COPY, TOO_SMALL, TOO_WIDE, ONE_WORD = range(6)
FRACTIONS = {EXACT_COPY: 0.05, REENCODED_COPY: 0.05, TOO_SMALL: 0.01, TOO_WIDE: 0.01, ONE_WORD: 0.01}
BLOCKS, BLOCK_PIXELS = 4, 16  # 4x4 blocks of 16x16 pixels: 64x64 images
WORDS = ("red green blue yellow purple orange white black grey pink brown gold silver small large round square "
         "flat bright dark pale striped dotted shiny old new cat dog bird fish horse tree flower house car boat "
         "plane train bike lamp chair table cup bowl hat shoe bag book clock phone key ring star moon sun cloud "
         "rain snow river hill road bridge tower door window wall garden beach forest field city street market "
         "kitchen room sky night morning photo drawing icon painting sketch logo pattern").split()


# ---------------------------------------------------------------------------------------------------------------------
# the synthetic dataset (parent process)


class Plan:
    """What every sample is, all drawn up front from one seeded generator, so any sample can be rebuilt from its
    number alone (a copy regenerates its original's bytes instead of keeping earlier shards in memory)."""

    def __init__(self, samples: int, seed: int):
        rng = np.random.default_rng(seed)
        self.blocks = rng.integers(0, 256, (samples, BLOCKS, BLOCKS, 3), dtype=np.uint8)  # 48 B a sample
        self.caption_lengths = rng.integers(3, 8, samples)
        self.caption_words = rng.integers(0, len(WORDS), (samples, 7))
        draw = rng.random(samples)
        self.kind = np.full(samples, PLAIN)
        low = 0.0
        for kind, fraction in FRACTIONS.items():
            self.kind[(draw >= low) & (draw < low + fraction)] = kind
            low += fraction
        self.source = np.arange(samples)  # a copy's original: an earlier plain sample
        plain_so_far: list[int] = []
        for number in range(samples):
            if self.kind[number] in (EXACT_COPY, REENCODED_COPY):
                if plain_so_far:
                    self.source[number] = plain_so_far[rng.integers(len(plain_so_far))]
                else:
                    self.kind[number] = PLAIN  # nothing earlier to copy
            if self.kind[number] == PLAIN:
                plain_so_far.append(number)

    def caption(self, number: int) -> str:
        original = self.source[number]
        words = 1 if self.kind[number] == ONE_WORD else self.caption_lengths[original]
        return " ".join(WORDS[w] for w in self.caption_words[original, :words])

    def original_jpeg(self, number: int) -> bytes:
        pixels = self.blocks[number].repeat(BLOCK_PIXELS, axis=0).repeat(BLOCK_PIXELS, axis=1)  # (64, 64, 3)
        if self.kind[number] == TOO_SMALL:
            pixels = pixels[:12, :12]
        elif self.kind[number] == TOO_WIDE:
            pixels = pixels[:16]
        return _jpeg(Image.fromarray(np.ascontiguousarray(pixels)), 90)

    def jpeg(self, number: int) -> bytes:
        if self.kind[number] == EXACT_COPY:
            return self.original_jpeg(self.source[number])
        if self.kind[number] == REENCODED_COPY:
            return _jpeg(Image.open(io.BytesIO(self.original_jpeg(self.source[number]))), 75)
        return self.original_jpeg(number)


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def build_dataset(folder: Path, plan: Plan, samples_per_shard: int) -> None:
    """Shards and manifest.parquet in `folder`, unless its manifest exists (written last: the dataset is whole)."""
    if (folder / "manifest.parquet").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    samples = len(plan.kind)
    digits = max(4, len(str(samples_per_shard - 1)))
    shards = []
    start = time.perf_counter()
    for shard, first in enumerate(range(0, samples, samples_per_shard)):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index, number in enumerate(range(first, min(first + samples_per_shard, samples))):
                key = f"{shard:05d}{index:0{digits}d}"
                _add(tar, f"{key}.jpg", plan.jpeg(number))
                _add(tar, f"{key}.txt", plan.caption(number).encode())
        size = min(samples_per_shard, samples - first)
        with open(path, "rb") as f:
            offsets = tar_sample_offsets(f)
        shards.append(ShardInfo(shard=shard, path=path.name, samples=size, attempted=size, failed=0,
                                bytes=path.stat().st_size, offsets=offsets))
        print(f"dataset: shard {shard + 1} written ({first + size:,}/{samples:,} samples, "
              f"{time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    summary = IngestSummary(input_rows=samples, successes=samples, shards=len(shards),
                            bytes=sum(s.bytes for s in shards), seconds=round(time.perf_counter() - start, 2))
    write_manifest(str(folder), shards, summary)


def build_tokenizer(folder: Path, plan: Plan, preset: str) -> Path:
    """A BPE tokenizer trained on the dataset's captions, sized for the preset (cached beside the shards)."""
    from training.model import MODEL_PRESETS
    from training.tokenizer import train_tokenizer

    target = folder / f"tokenizer-{preset}"
    if not (target / "tokenizer.json").exists():
        config = MODEL_PRESETS[preset]
        captions = (plan.caption(number) for number in range(len(plan.kind)))
        train_tokenizer(captions, vocab_size=config.vocab_size, context_length=config.context_length).save(target)
    return target


def found_duplicates(output: Path, plan: Plan, samples_per_shard: int) -> dict[str, int]:
    """The duplicate pairs the filter reported (removed.parquet, detail "of <key>"), by what was planted there: an exact
    copy, a re-encoded copy, or nothing (two unrelated images the rules called near-duplicates)."""
    import pyarrow.parquet as pq

    def number(key: str) -> int:  # keys are <shard:5><index>, as build_dataset writes them
        return int(key[:5]) * samples_per_shard + int(key[5:])

    found = {"exact_copies": 0, "reencoded_copies": 0, "not_planted": 0}
    for row in pq.read_table(output / "removed.parquet", columns=["key", "reason", "detail"]).to_pylist():
        if row["reason"] != "duplicate":
            continue
        removed, kept = number(row["key"]), number(row["detail"].removeprefix("of "))
        if plan.source[removed] != plan.source[kept]:
            found["not_planted"] += 1
        elif REENCODED_COPY in (plan.kind[removed], plan.kind[kept]):
            found["reencoded_copies"] += 1
        else:
            found["exact_copies"] += 1
    return found


# ---------------------------------------------------------------------------------------------------------------------
# the measured run (child process)


class Timers:
    """Wall seconds and call counts of wrapped functions."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def wrap(self, name: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
        return timed


def _peak_rss_kib() -> int:
    """Peak resident set of this process's own address space (VmHWM), KiB; see the module docstring."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; may include the parent's peak


def run_filter(args: argparse.Namespace, data: Path, tokenizer_path: Path | None, output: Path) -> dict:
    """In this (fresh) process: build the embedder, run `filter_dataset` under timers, return the numbers."""
    import torch

    import pipeline.filter as filter_module
    from pipeline.filter import FilterConfig, filter_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    timers = Timers()
    embedder, precision, rules = None, None, {}
    if args.model:
        from evaluation.filtering import ModelEmbedder
        from training.device import resolve_device, resolve_precision
        from training.model import create_model
        from training.tokenizer import Tokenizer

        torch.manual_seed(0)
        device = resolve_device(args.device)
        model = create_model(args.preset).to(device).eval()
        precision = resolve_precision(args.precision, device)
        embedder = ModelEmbedder(model, Tokenizer.load(tokenizer_path), precision)
        embedder.images = timers.wrap("embed_images", embedder.images)  # instance attributes shadow the methods
        embedder.texts = timers.wrap("embed_texts", embedder.texts)
        rules = {"duplicate_similarity": 0.95, "clip_score_top_fraction": 0.9}
    config = FilterConfig(data=str(data), output=str(output), min_words=2, min_image_size=16, max_aspect_ratio=3,
                          duplicate_hash_distance=8, exact_search_limit=args.exact_search_limit,
                          batch_size=args.batch_size, **rules)

    # filter_dataset looks these up as module globals at call time, so wrapping the attributes times them in place
    searches: list[dict] = []
    original_neighbours = filter_module.neighbours

    def neighbours(index_vectors: np.ndarray, queries: np.ndarray, k: int, exact_limit: int,
                   binary: bool = False) -> tuple[np.ndarray, np.ndarray]:
        start = time.perf_counter()
        result = original_neighbours(index_vectors, queries, k, exact_limit, binary)
        searches.append({"kind": "hash" if binary else "embedding", "rows": len(index_vectors),
                         "hnsw": len(index_vectors) > exact_limit, "seconds": round(time.perf_counter() - start, 3)})
        return result

    filter_module.neighbours = neighbours
    for name, attribute in (("scan", "scan_shard"), ("decide", "decide"), ("write", "_copy_kept"),
                            ("duplicate_pairs", "near_duplicate_pairs"), ("deduplicate", "greedy_deduplicate")):
        setattr(filter_module, attribute, timers.wrap(name, getattr(filter_module, attribute)))

    start = time.perf_counter()
    manifest = filter_dataset(config, (lambda: embedder) if embedder is not None else None, progress=False)
    seconds = time.perf_counter() - start
    passes = {name: round(timers.seconds[name], 2) for name in ("scan", "embed_images", "embed_texts", "decide",
                                                                 "duplicate_pairs", "deduplicate", "write")}
    passes["other"] = round(seconds - timers.seconds["scan"] - timers.seconds["decide"] - timers.seconds["write"], 2)
    summary = manifest.summary
    return {"seconds": round(seconds, 2), "samples_per_second": round(summary.input_rows / seconds, 1),
            "peak_rss_kib": _peak_rss_kib(), "passes": passes, "searches": searches,
            "kept": summary.successes, "removed": summary.failures, "input_rows": summary.input_rows,
            "torch_threads": torch.get_num_threads(), "precision": precision}


# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000, help="samples in the synthetic dataset")
    parser.add_argument("--samples-per-shard", type=int, default=10_000, help="samples per tar shard")
    parser.add_argument("--workdir", default=".clipforge/bench-filter", help="dataset cache and filter output")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument("--model", action=argparse.BooleanOptionalAction, default=True,
                        help="embed with a random model (CLIP score and embedding duplicates); --no-model skips it")
    parser.add_argument("--preset", default="tiny", help="model preset of the random model")
    parser.add_argument("--exact-search-limit", type=int, default=20_000,
                        help="FilterConfig.exact_search_limit: above this many rows faiss searches an HNSW graph")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass (FilterConfig.batch_size)")
    parser.add_argument("--device", default="auto", help="where the model runs: auto, cpu or cuda")
    parser.add_argument("--precision", default="auto", help="auto, bf16 or fp32")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in the filter process (0: torch's default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # internal: the measured process
    args = parser.parse_args()

    workdir = Path(args.workdir).absolute()
    data = workdir / f"data-{args.samples}x{args.samples_per_shard}-seed{args.seed}"
    tokenizer_path = data / f"tokenizer-{args.preset}" if args.model else None
    output = workdir / "out"
    if args.child:
        print(json.dumps(run_filter(args, data, tokenizer_path, output)))
        return

    start = time.perf_counter()
    plan = Plan(args.samples, args.seed)
    build_dataset(data, plan, args.samples_per_shard)
    if args.model:
        build_tokenizer(data, plan, args.preset)
    prepare_seconds = time.perf_counter() - start
    planted = Counter(int(k) for k in plan.kind)

    shutil.rmtree(output, ignore_errors=True)  # a fresh run: the filter would otherwise resume the last one
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child"],
                          stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"the filter process failed (exit {done.returncode}); its errors are above")
    result = json.loads(done.stdout.strip().splitlines()[-1])

    hnsw = any(s["hnsw"] for s in result["searches"])
    duplicates = found_duplicates(output, plan, args.samples_per_shard)
    line = {"samples": args.samples, "samples_per_shard": args.samples_per_shard,
            "model": args.preset if args.model else None, **result, "hnsw": hnsw,
            "exact_search_limit": args.exact_search_limit, "cpu": cpu_name(), "cpus": os.cpu_count(),
            "planted": {"exact_copies": planted[EXACT_COPY], "reencoded_copies": planted[REENCODED_COPY],
                        "too_small": planted[TOO_SMALL], "aspect_ratio": planted[TOO_WIDE],
                        "one_word_captions": planted[ONE_WORD]},
            "duplicate_pairs_found": duplicates,
            "prepare_seconds": round(prepare_seconds, 1)}

    passes = result["passes"]
    print(f"{line['cpu']} ({line['cpus']} CPUs), {result['torch_threads']} torch threads, "
          f"model {line['model'] or 'none'} ({result['precision'] or '-'}), dataset ready in {prepare_seconds:.0f} s")
    print(f"filter: {args.samples:,} samples in {result['seconds']:.1f} s = "
          f"{result['samples_per_second']:,.0f} samples/s, peak RSS {result['peak_rss_kib'] / 1024:,.0f} MiB")
    print(f"  scan {passes['scan']:.1f} s (embed images {passes['embed_images']:.1f} s, "
          f"captions {passes['embed_texts']:.1f} s) | decide {passes['decide']:.1f} s "
          f"(duplicate pairs {passes['duplicate_pairs']:.1f} s, greedy "
          f"{passes['deduplicate']:.1f} s) | write {passes['write']:.1f} s | other {passes['other']:.1f} s")
    for search in result["searches"]:
        print(f"  faiss {search['kind']}: {search['rows']:,} rows, {'HNSW' if search['hnsw'] else 'exact'}, "
              f"{search['seconds']:.2f} s")
    removed = ", ".join(f"{reason} {count:,}" for reason, count in result["removed"].items())
    print(f"  kept {result['kept']:,}; removed: {removed or 'none'}")
    print(f"  planted: {planted[EXACT_COPY]:,} exact + {planted[REENCODED_COPY]:,} re-encoded copies, "
          f"{planted[TOO_SMALL]:,} too small, {planted[TOO_WIDE]:,} too wide, {planted[ONE_WORD]:,} one-word captions")
    print(f"  duplicate pairs found: {duplicates['exact_copies']:,} exact copies, {duplicates['reencoded_copies']:,} "
          f"re-encoded copies, {duplicates['not_planted']:,} not planted")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
