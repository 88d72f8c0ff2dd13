"""What `mistol bench` runs: mistol, transformers and llama.cpp on one machine, in one run.

    mistol bench --shape 7b [--quant int8,int4,bf16] [--engines mistol,transformers,llama.cpp] [--json]

Every engine/format pair runs in a process of its own (see engines.py), on the same random
prompt ids. The engines measured at one format (mistol int4 and llama.cpp Q4_0, say) are
loaded together where memory allows and take turns decoding, a few steps each: this
machine's bandwidth drifts by half within minutes, and engines measured one after the
other would be compared under different loads. For the same reason the memory bandwidth is
read in turns with the decoding too (a 1 GiB sum after each round of turns): decode speed is
compared with its ceiling at that time, bandwidth / bytes per token. The bandwidth is also
measured at the start and the end of the run.

Float formats are loaded by mistol and transformers from one checkpoint file that both map,
so that a bf16 7B pair holds one copy of most weights and can take turns in 24 GB.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..util import available_memory
from .engines import (ENGINES, LLAMA_CPP_AMX_NOTE, Spec, cpu_has_amx, llama_cpp_build_has_amx, page_environment,
                      spec_config)
from .shapes import GGUF_TYPES, all_weights, bytes_per_token, model_config

QUANTIZED = ("int8", "int4")
WORKER_TIMEOUT_S = 3 * 3600
TURN_STEPS = 4  # decode steps an engine times per turn (plus one untimed: the other engine just ran)
PROBE_BYTES = 1 << 30  # read in turns with the decoding, for the bandwidth at that time


def run_bench(shape: str, formats: list[str], engines: list[str], prompts: list[int], steps: int, threads: int,
              cache_dir: Path, pages: list[str] | None = None, ggufs: list[Path] | None = None,
              busy_core: bool = False) -> dict:
    """Measure each engine at each format (the pairs that apply, installed and fitting in memory)
    and return the report that `report_table` prints; model files are written to `cache_dir`.

    `threads` (0: mistol's default, one per core) is resolved here once and given to every
    engine; `pages` lists the page settings to measure each engine with ("huge", "small");
    `ggufs`, when given, are the files to measure instead of the shape's random models: each
    file by mistol and llama.cpp. `busy_core`: each mistol model measured is also decoded with
    one core kept busy, at its default threads and at 1 and 2 (bench.busy)."""
    say = (lambda text: print(text, file=sys.stderr, flush=True))
    threads = threads or default_threads()
    pages = pages or ["huge"]

    plan: list[Spec] = []
    notes: list[str] = []
    if ggufs:
        for path in ggufs:
            for engine in engines:
                if engine == "transformers":
                    continue  # (it reads no GGUF files of these types)
                plan += [Spec(engine, gguf_label(path), path.name, prompts, steps, threads, page, gguf=str(path))
                         for page in pages]
    else:
        for engine in engines:
            for fmt in formats:
                if engine == "transformers" and fmt in QUANTIZED:
                    continue  # transformers has no CPU int8/int4 path of this kind
                if engine == "llama.cpp" and fmt not in QUANTIZED:
                    continue  # compared at the same bits as mistol's quantized formats
                plan += [Spec(engine, fmt, shape, prompts, steps, threads, page) for page in pages]
    available = _available(engines)
    bandwidth = [measure_bandwidth(threads)]
    say(f"memory read bandwidth ({threads} threads): {bandwidth[0]:.1f} GB/s")
    runnable: list[tuple[Spec, Memory]] = []
    for spec in plan:
        label = _label(spec)
        if not available[spec.engine]:
            notes.append(f"{label}: skipped ({_MISSING[spec.engine]})")
            continue
        need, free = _memory_need(spec, spec_config(spec) if spec.gguf else model_config(shape)), available_memory()
        if need.total > free:
            notes.append(f"{label}: skipped (needs about {need.total / 2**30:.1f} GiB, "
                         f"{free / 2**30:.1f} GiB available)")
            continue
        runnable.append((spec, need))
    results = []
    for group in _groups(runnable):
        try:
            for spec in group:
                if spec.gguf:
                    continue
                if spec.engine == "llama.cpp":
                    spec.gguf = str(_gguf_file(cache_dir, shape, spec.fmt, model_config(shape), say))
                elif spec.fmt not in QUANTIZED:
                    spec.checkpoint = str(_checkpoint(cache_dir, shape, spec.fmt, say))
        except OSError as e:
            notes += [f"{_label(spec)}: skipped (cannot write its model file: {e})" for spec in group]
            continue
        labels = " and ".join(_label(spec) for spec in group)
        say(f"measuring {labels}" + (", taking turns decoding ..." if len(group) > 1 else " ..."))
        for result in _measure(group, threads):
            if "error" in result:
                notes.append(f"{_label(Spec(**{k: result[k] for k in ('engine', 'fmt', 'shape', 'pages')}))}: "
                             f"failed ({result['error']})")
            elif ggufs:  # both engines' ceiling: what a step reads of the file
                result["gguf_weight_bytes"] = gguf_weight_bytes(Path(result["gguf"]))
            results.append(result)
    if cpu_has_amx() and any(llama_cpp_build_has_amx(r.get("system_info") or "") for r in results):
        notes.append(LLAMA_CPP_AMX_NOTE)
    busy = _busy_core(runnable, results, notes, say) if busy_core else []
    bandwidth.append(measure_bandwidth(threads))
    shape_name = ", ".join(p.name for p in ggufs) if ggufs else shape
    report = _report(model_config(shape) if not ggufs else None, shape_name, results, bandwidth, notes, threads)
    return {**report, "busy_core": busy}


def _busy_core(runnable: list[tuple[Spec, Memory]], results: list[dict], notes: list[str], say) -> list[dict]:
    """bench.busy's figures for each mistol model measured (once per model: its first page
    setting), where three copies of it fit in memory."""
    import torch

    from .busy import busy_core_decode

    done, found = set(), []
    measured = {(r["engine"], r["fmt"], r["shape"], r["pages"]) for r in results if "error" not in r}
    for spec, need in runnable:
        key = (spec.fmt, spec.shape)
        if spec.engine != "mistol" or key in done or (spec.engine, *key, spec.pages) not in measured:
            continue
        done.add(key)
        label = _label(spec)
        if 3 * need.total > available_memory():
            notes.append(f"{label} with a core busy: skipped (three copies need about "
                         f"{3 * need.total / 2**30:.1f} GiB)")
            continue
        say(f"decoding {label} with one core busy (a `yes` running): default threads, 1 and 2, taking turns ...")
        try:
            found.append({"model": label, **busy_core_decode(spec, torch.get_num_threads(), Worker)})
        except WorkerError as e:
            notes.append(f"{label} with a core busy: failed ({e})")
    return found


KQUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K")  # the k-quant files people download most


def kquant_files(directory: Path, shape: str, ftypes: list[str], threads: int, say) -> list[Path]:
    """The shape's random weights as GGUF files that llama.cpp's quantizer made from an F16
    file (written once into `directory` and kept for the next run)."""
    from .models import write_bench_gguf, write_llama_cpp_quantized

    f16 = directory / f"random-{shape}-F16.gguf"
    paths = []
    for ftype in ftypes:
        path = directory / f"random-{shape}-{ftype}.gguf"
        if not path.is_file():
            if not f16.is_file():
                say(f"writing {f16} (the source of the k-quant files) ...")
                write_bench_gguf(f16, model_config(shape), "F16", progress=None)
            say(f"quantizing it to {ftype} with llama.cpp's quantizer ...")
            write_llama_cpp_quantized(path, f16, ftype, threads)
        paths.append(path)
    return paths


def default_threads() -> int:
    """The threads mistol runs on when not told (one per idle core: `mistol.threads`)."""
    import torch

    from ..threads import default_threads as mistol_default

    return mistol_default(torch.get_num_threads())[0]


@functools.lru_cache(maxsize=None)
def _gguf_header(path: Path):
    """A GGUF file's header, read once per run (a 7B file's holds ~300 tensors)."""
    from ..weights.gguf_file import GGUFFile

    return GGUFFile(path)


def gguf_label(path: Path) -> str:
    """A GGUF file's type as llama.cpp names it ("Q4_K_M"), from its `general.file_type`."""
    from ..weights.gguf_package import gguf

    value = _gguf_header(path).get("general.file_type")
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return "GGUF"


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of a GGUF file's tensors that one decode step reads: all but the token
    embedding (of which it reads one row), unless the embedding is also the head."""
    tensors = _gguf_header(path).tensors
    tied = "output.weight" not in tensors
    return sum(int(t.n_bytes) for name, t in tensors.items() if name != "token_embd.weight" or tied)


_MISSING = {"transformers": "pip install transformers", "llama.cpp": "pip install llama-cpp-python", "mistol": ""}


def _available(engines: list[str]) -> dict[str, bool]:
    import importlib.util

    modules = {"mistol": "mistol", "transformers": "transformers", "llama.cpp": "llama_cpp"}
    return {e: importlib.util.find_spec(modules[e]) is not None for e in ENGINES}


def _format_name(spec: Spec) -> str:
    return GGUF_TYPES.get(spec.fmt, spec.fmt) if spec.engine == "llama.cpp" else spec.fmt


def _checkpoint(directory: Path, shape: str, fmt: str, say) -> Path:
    from .models import write_bench_checkpoint

    path = directory / f"random-{shape}-{fmt}"
    if not (path / "model.safetensors").is_file():
        say(f"writing {path} for mistol and transformers (kept for the next run) ...")
        write_bench_checkpoint(path, shape, fmt, progress=None)
    return path


def _gguf_file(directory: Path, shape: str, fmt: str, config, say) -> Path:
    from .models import write_bench_gguf

    path = directory / f"random-{shape}-{GGUF_TYPES[fmt]}.gguf"
    if not path.is_file():
        say(f"writing {path} for llama.cpp (kept for the next run) ...")
        write_bench_gguf(path, config, GGUF_TYPES[fmt], progress=None)
    return path


def _label(spec: Spec) -> str:
    pages = "" if spec.pages == "huge" else f" ({spec.pages} pages)"
    model = f" ({spec.shape})" if spec.gguf and spec.shape == Path(spec.gguf).name else ""  # (a --gguf file)
    return f"{spec.engine} {_format_name(spec)}{model}{pages}"


@dataclass
class Memory:
    """What an engine needs: its own memory, and the mapped weights it can share with another
    engine of its format (they map one file; mistol copies its down projections into tiles,
    see `mistol.model.linear.TiledLinear`)."""

    own: float
    shared: float = 0.0

    @property
    def total(self) -> float:
        return self.own + self.shared


def _memory_need(spec: Spec, config) -> Memory:
    import torch

    from ..model.linear import tiles_pay_off

    weights = all_weights(config)
    embedding = config.vocab_size * config.hidden_size * 4
    if spec.gguf and spec.engine in ("mistol", "llama.cpp") and spec.fmt not in ("F32", "F16", "BF16", "GGUF"):
        return Memory(os.path.getsize(spec.gguf) * 1.15)  # a quantized file's blocks, as they are (or repacked)
    if spec.engine == "mistol" and (spec.fmt in QUANTIZED or spec.gguf):  # quantized linears, float32 embedding
        return Memory(weights * 1.1 + embedding)
    if spec.engine == "llama.cpp":
        return Memory(weights * 1.1 * 1.1)
    element = 4 if spec.fmt == "f32" else 2
    mapped = weights * element  # a float checkpoint, mapped
    own = 0.05 * mapped
    if spec.engine == "mistol" and tiles_pay_off((config.hidden_size, config.intermediate_size), torch.device("cpu")):
        own += config.num_layers * config.hidden_size * config.intermediate_size * element  # tiled copies
    return Memory(own, mapped)


def _groups(runnable: list[tuple[Spec, Memory]]) -> list[list[Spec]]:
    """The engines of each format, page setting and file, together where their memory fits
    at once, else one by one."""
    groups = []
    for key in dict.fromkeys((spec.fmt, spec.pages, spec.gguf) for spec, _ in runnable):
        specs = [(spec, need) for spec, need in runnable if (spec.fmt, spec.pages, spec.gguf) == key]
        together = sum(need.own for _, need in specs) + max((need.shared for _, need in specs), default=0)
        if len(specs) > 1 and together + PROBE_BYTES <= available_memory():
            groups.append([spec for spec, _ in specs])
        else:
            groups += [[spec] for spec, _ in specs]
    return groups


class WorkerError(Exception):
    pass


class Worker:
    """One engine's process (engines.py), asked one request at a time."""

    def __init__(self, spec: Spec):
        command = [sys.executable, "-m", "mistol.bench.engines", json.dumps(asdict(spec))]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **page_environment(spec.pages)}
        if spec.threads:
            env["OMP_NUM_THREADS"] = str(spec.threads)
        self.spec = spec
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.watchdog = threading.Timer(WORKER_TIMEOUT_S, self.process.kill)
        self.watchdog.start()
        try:
            self.ask(None)  # until it has loaded its model
        except WorkerError:
            self.close()
            raise

    def ask(self, request: dict | None) -> dict:
        try:
            if request is not None:
                self.process.stdin.write(json.dumps(request) + "\n")
                self.process.stdin.flush()
            line = self.process.stdout.readline()
        except OSError:
            line = ""
        if not line:
            status = self.process.wait()
            timed_out = not self.watchdog.is_alive()
            raise WorkerError(f"took longer than {WORKER_TIMEOUT_S} s" if timed_out
                              else f"the worker exited with status {status} and no result")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(reply["error"])
        return reply

    def close(self) -> None:
        self.watchdog.cancel()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _measure(specs: list[Spec], threads: int) -> list[dict]:
    """Each spec's figures (or its error). The engines load one after the other, measure
    their prompts one after the other, then take turns decoding, TURN_STEPS at a time; after
    each round of turns the memory bandwidth is read."""
    results = {id(spec): {**asdict(spec)} for spec in specs}
    started: list[Worker] = []
    probe = BandwidthProbe(threads)

    def attempt(spec: Spec, action) -> bool:
        try:
            action()
            return True
        except WorkerError as e:
            results[id(spec)]["error"] = str(e)
            return False

    try:
        for spec in specs:
            attempt(spec, lambda: started.append(Worker(spec)))
        workers = [w for w in started if attempt(w.spec, lambda: results[id(w.spec)].update(w.ask({"do": "prompts"})))]
        steps: dict[int, list[float]] = {id(w.spec): [] for w in workers}
        while any(len(steps[id(w.spec)]) < w.spec.steps for w in workers):
            for w in list(workers):
                n = min(TURN_STEPS, w.spec.steps - len(steps[id(w.spec)]))
                if n > 0 and not attempt(w.spec, lambda: steps[id(w.spec)].extend(
                        w.ask({"do": "decode", "steps": n + 1})["steps"][1:])):
                    workers.remove(w)
            probe.sample()
        for w in workers:
            if attempt(w.spec, lambda: results[id(w.spec)].update(w.ask({"do": "finish"}))):
                times = steps[id(w.spec)]
                results[id(w.spec)].update(
                    decode_tok_s=1 / statistics.median(times), decode_best_tok_s=1 / min(times),
                    decode_steps=len(times), decoded_with=[_label(o.spec) for o in workers if o is not w],
                    decode_bandwidth_gb_s=statistics.median(probe.samples))
    finally:
        for w in started:
            w.close()
    return [results[id(spec)] for spec in specs]


def measure_bandwidth(threads: int = 0, gib: float = 1.0, repeats: int = 8) -> float:
    """GB/s of reading 1 GiB from memory: the best of `repeats` reductions (a float32 sum and
    an int8 max, whose arithmetic is cheapest), as a decode step reads its weights."""
    import torch

    nbytes = int(gib * 2**30)
    with _torch_threads(threads):
        return max(_read_rate(make(), read, repeats)
                   for make, read in ((lambda: torch.ones(nbytes // 4), torch.Tensor.sum),
                                      (lambda: torch.ones(nbytes, dtype=torch.int8), torch.amax)))


class BandwidthProbe:
    """The memory's read rate now and then (the best of two float32 sums over 1 GiB): the
    bandwidth while engines take turns decoding."""

    def __init__(self, threads: int):
        import torch

        self.threads = threads
        self.x = torch.ones(PROBE_BYTES // 4)
        self.samples: list[float] = []

    def sample(self) -> None:
        import torch

        with _torch_threads(self.threads):
            self.samples.append(_read_rate(self.x, torch.Tensor.sum, 2))


@contextlib.contextmanager
def _torch_threads(threads: int):
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _read_rate(x, read, repeats: int) -> float:
    read(x)  # first touch: page faults
    return x.nbytes / min(_timed(lambda: read(x)) for _ in range(repeats)) / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _report(config, shape: str, results: list[dict], bandwidth: list[float], notes: list[str], threads: int) -> dict:
    """The rows (each engine's figures, its decode speed against the bandwidth ceiling) and
    the ratios of mistol to the others at each format. `config`: the shape's (None when
    measuring GGUF files: each row's file gives its own)."""
    rows = []
    # several GGUF files in one run: each row names its file, and only a file's own rows compare
    several_models = len({r["shape"] for r in results if "error" not in r}) > 1
    for r in results:
        if "error" in r:
            continue
        # the bandwidth read in turns with this engine's decoding (else the run's best)
        gbs = r.get("decode_bandwidth_gb_s") or max(bandwidth)
        context = min(r["prompts"]) + r["steps"] // 2
        row_config = config or spec_config(Spec(r["engine"], r["fmt"], r["shape"], gguf=r["gguf"]))
        kv_element = r.get("kv_element_bytes", 4)
        kv = 2 * row_config.num_layers * row_config.num_kv_heads * row_config.head_dim * context * kv_element
        if "gguf_weight_bytes" in r:  # a file's: both engines against what llama.cpp reads of it
            per_token = r["gguf_weight_bytes"] + kv
        else:
            per_token = bytes_per_token(row_config, r["fmt"], context, kv_element)
        ceiling = gbs * 1e9 / per_token
        name = _format_name(Spec(r["engine"], r["fmt"], r["shape"])) + (f" ({r['shape']})" if several_models else "")
        rows.append({**r, "format": name,
                     "bytes_per_token": per_token, "ceiling_bandwidth_gb_s": gbs, "roofline_tok_s": ceiling,
                     "roofline_share": r["decode_tok_s"] / ceiling, "weight_bytes": per_token - kv,
                     "rss_growth": r["peak_rss"] - r["base_rss"],
                     "rss_ratio": (r["peak_rss"] - r["base_rss"]) / (r["model_bytes"] + r["kv_bytes"])})
    ratios = []
    for ours in (row for row in rows if row["engine"] == "mistol"):
        for theirs in rows:
            if theirs["engine"] == "mistol" or _same_measure(theirs) != _same_measure(ours):
                continue
            ratio = {"mistol": ours["format"] + _pages_note(ours), "versus": f"{theirs['engine']} {theirs['format']}",
                     "decode": ours["decode_tok_s"] / theirs["decode_tok_s"],
                     # each against the bandwidth read while it decoded: the two compared
                     # at the same bandwidth (what matters where they could not take turns)
                     "decode_same_bandwidth": ours["roofline_share"] / theirs["roofline_share"],
                     "ttft": theirs["ttft_s"] / ours["ttft_s"]}
            for n in ours["prefill_tok_s"]:
                ratio[f"prefill_{n}"] = ours["prefill_tok_s"][n] / theirs["prefill_tok_s"][n]
            ratios.append(ratio)
    system_info = next((r["system_info"] for r in rows if r.get("system_info")), None)
    return {"shape": shape, "threads": threads, "bandwidth_gb_s": bandwidth, "rows": rows, "ratios": ratios,
            "llama_cpp_system_info": system_info, "machine": machine_line(), "notes": notes}


def _same_measure(row: dict) -> tuple:
    """What two engines' rows share when they measured the same thing: format, pages, model."""
    return row["fmt"], row["pages"], row["shape"]


def _pages_note(row: dict) -> str:
    return "" if row["pages"] == "huge" else f" ({row['pages']} pages)"


def machine_line() -> str:
    """The CPU's model name and the SIMD extensions the kernels choose between."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni") if f in flags]
    return f"{name}, {os.cpu_count()} CPUs ({' '.join(simd) or 'no AVX2'})"


def prefill_path_lines(rows: list[dict]) -> list[str]:
    """How mistol's quantized rows multiplied prefill-sized inputs: the k-quants requantized
    to int8 and bf16 matmuls on dequantized weights, each from some number of rows on, or the
    formats' own int8-activation kernels at every length."""
    quantized = [r for r in rows if r["engine"] == "mistol" and r.get("kernels", "torch") != "torch"]
    if not quantized:
        return []
    int8 = {f: n for r in quantized for f, n in r.get("int8_prefill_rows", {}).items()}
    bf16 = {f: n for r in quantized for f, n in r.get("bf16_prefill_rows", {}).items()}
    lines = []
    if int8:
        lines.append("mistol prefill: weights as int8 blocks, 8 rows at a time (the k-quants requantized, the legacy "
                     "types' quants as they are), for the int8 kernels from this many rows on "
                     f"({', '.join(f'{f} from {n}' for f, n in sorted(int8.items()))})"
                     + ("; the k-quants' products in AMX int8 tiles" if any(r.get("int8_tiles") for r in quantized)
                        else ""))
    if bf16:
        crossover = ", ".join(f"{f} from {n}" for f, n in bf16.items())
        lines.append(f"mistol prefill: bf16 matmuls on dequantized weights from this many rows on ({crossover}), "
                     "its int8-activation kernels below (--no-bf16: the kernels at every length, as on a CPU without "
                     "bf16 instructions)")
    elif not int8:
        lines.append("mistol prefill: its int8-activation kernels at every prompt length (bf16 instructions unused: "
                     "they do not pay for these formats on this CPU, it has none, or --no-bf16)")
    return lines


def report_table(report: dict) -> str:
    rows = report["rows"]
    prompts = sorted({int(n) for r in rows for n in r["prefill_tok_s"]})
    bw = report["bandwidth_gb_s"]
    lines = [f"model {report['shape']}; {report['machine']}; {report['threads']} threads for every engine",
             f"memory read bandwidth {bw[0]:.1f} GB/s at the start, {bw[-1]:.1f} GB/s at the end"]
    if report.get("llama_cpp_system_info"):
        lines.append(f"llama.cpp build: {report['llama_cpp_system_info']}")
    lines += prefill_path_lines(rows)
    lines.append("")
    head = ["engine", "format"] + [f"prefill {n}" for n in prompts] + [
        "TTFT s", "decode tok/s", "GB/s", "ceiling", "of ceiling", "peak RSS", "RSS/(model+KV)", "threads",
        "huge pages"]
    table = [head]
    for r in rows:
        table.append([r["engine"], r["format"] + _pages_note(r)] + [f"{r['prefill_tok_s'][str(n)]:.2f}" for n in prompts] + [
            f"{r['ttft_s']:.2f}", f"{r['decode_tok_s']:.2f}", f"{r['ceiling_bandwidth_gb_s']:.1f}",
            f"{r['roofline_tok_s']:.2f}",
            f"{100 * r['roofline_share']:.0f}%", f"{r['peak_rss'] / 2**30:.2f} GiB",
            f"{r['rss_ratio']:.2f}", str(r.get("threads_used", "?")),
            f"{r.get('huge_page_bytes', 0) / 2**30:.2f} GiB"])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for n, row in enumerate(table):
        lines.append("  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("prefill and decode in tokens/s; ceiling = bandwidth (read in turns with the decoding, column "
                 "'GB/s') / bytes read per decoded token; "
                 "RSS/(model+KV) = growth of the peak RSS while measuring over the bytes of the model (a GGUF "
                 "file's size, for both engines; else as mistol holds it: quantized layers, float embedding and "
                 "norms) plus its KV cache; "
                 "huge pages = the engine's memory in transparent huge pages at the end (every engine asks for "
                 "them unless --pages small; llama.cpp loads without mmap, so that its weights can have them)")
    together = sorted({" with ".join(sorted(f"{o['engine']} {o['format']}{_pages_note(o)}" for o in rows
                                            if _same_measure(o) == _same_measure(r)))
                       for r in rows if r.get("decoded_with")})
    if together:
        lines.append(f"decoding in turns of {TURN_STEPS} steps, under the same load: " + "; ".join(together))
    if report["ratios"]:
        lines.append("")
        for ratio in report["ratios"]:
            decode = f"decode {ratio['decode']:.2f}"
            if abs(ratio["decode_same_bandwidth"] / ratio["decode"] - 1) > 0.05:
                decode += f" ({ratio['decode_same_bandwidth']:.2f} at the same memory bandwidth)"
            parts = [decode] + [
                f"prefill {k.split('_')[1]} {v:.2f}" for k, v in ratio.items() if k.startswith("prefill_")]
            lines.append(f"mistol {ratio['mistol']} / {ratio['versus']} (speed ratios, >1: mistol faster): "
                         + ", ".join(parts) + f", time to first token {ratio['ttft']:.2f}")
    if report.get("busy_core"):
        lines.append("")
        lines.append("decode with one core busy (a `yes` running), mistol's default threads against 1 and 2, "
                     "taking turns:")
        for b in report["busy_core"]:
            speeds = ", ".join(f"{k} {v:.2f}" for k, v in b["tok_s"].items())
            lines.append(f"  {b['model']}: {speeds} tok/s; the default ({b['default_threads']}: {b['why']}) "
                         f"is {b['of_best']:.2f} of the best of 1 and 2 threads")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
