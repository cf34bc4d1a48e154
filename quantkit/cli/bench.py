from __future__ import annotations

import argparse
from pathlib import Path

from quantkit.cli.common import non_negative_int, positive_int, thread_count


class Bench:
    """Measure latency and throughput of an ONNX model (ONNX Runtime) or a TensorRT engine.

    Inputs are random data (seeded) of the model's input types and the given batch or shapes.
    Reports min / median / mean / p90 / p99 latency and throughput, and names the backend and
    device measured. TensorRT-only options: --cuda-graph, --no-transfers, --streams.

    examples:
      quantkit bench model.plan --batch 32 --warmup 200 --iterations 1000 --cuda-graph
      quantkit bench out/model.int8.onnx --batch 1 --iterations 100
    """

    name = "bench"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", metavar="MODEL", help=".onnx (ONNX Runtime, CPU) or .plan/.engine (TensorRT)")
        parser.add_argument("--batch", type=positive_int, default=None,
                            help="batch size for a dynamic batch dim (default 1); a model with a fixed batch size is "
                                 "measured at that size, and another --batch is refused (exit 2)")
        parser.add_argument("--shapes", metavar="NAME=SHAPE", action="append",
                            help="input shape, e.g. input=8x3x224x224 (overrides --batch for that input; "
                                 "NAME=MIN/OPT/MAX measures OPT; trtexec's NAME:SHAPE works too)")
        parser.add_argument("--warmup", type=non_negative_int, default=10, help="untimed runs first (default 10)")
        parser.add_argument("--iterations", type=positive_int, default=100, help="at least this many timed runs (default 100)")
        parser.add_argument("--duration", type=float, default=None, metavar="S", help="and at least this many seconds")
        parser.add_argument("--threads", type=thread_count, default=None, help="ONNX Runtime threads (default: one per core)")
        parser.add_argument("--cuda-graph", action="store_true", help="TensorRT: replay a captured CUDA graph")
        parser.add_argument("--no-transfers", action="store_true",
                            help="TensorRT: inputs stay on the GPU (no host-device copies), as trtexec measures")
        parser.add_argument("--streams", type=positive_int, default=1, help="TensorRT: concurrent streams (default 1)")
        parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random inputs (default 0)")
        parser.add_argument("--json", metavar="FILE", help="also write the statistics as JSON")
        parser.add_argument("--force", action="store_true", help="replace an existing --json FILE that an earlier bench wrote")

    def run(self, args: argparse.Namespace) -> int:
        from quantkit._io import check_output_file, is_result_json, write_json_atomic
        from quantkit.backends import ENGINE_SUFFIXES, check_model_file, runner_from_path
        from quantkit.bench import feed_batch, measure_latency, random_feed, stats_from_times
        from quantkit.errors import InputError
        from quantkit.backends.tensorrt.builder import parse_shapes

        check_model_file(args.model)  # before any backend loads: a missing .plan is missing, not TensorRT
        if args.json:  # before the work: never over the model, never an unasked overwrite
            check_output_file(args.json, force=args.force, inputs=[args.model], replaceable=is_result_json("bench"),
                              what="an earlier `quantkit bench --json` result")
        trt_options = args.cuda_graph or args.no_transfers or args.streams > 1
        is_engine = Path(args.model).suffix.lower() in ENGINE_SUFFIXES
        if is_engine:  # bytes that are no engine are bad input, whether TensorRT is installed or not
            from quantkit.cli.inspect import check_engine_file

            check_engine_file(Path(args.model))
        if trt_options and not is_engine:
            raise InputError("--cuda-graph, --no-transfers and --streams apply to TensorRT engines only",
                             hint="drop them for an .onnx model (ONNX Runtime on CPU)")
        shapes = {n: p.opt for n, p in parse_shapes(args.shapes).items()}
        # speed as ONNX Runtime deploys a Q/DQ model: its integer kernels
        with runner_from_path(args.model, threads=args.threads, integer_kernels=True) as runner:
            for spec in runner.input_specs:
                fixed = spec.static_batch
                if args.batch is not None and fixed is not None and fixed != args.batch and spec.name not in shapes:
                    raise InputError(f"--batch {args.batch}: {Path(args.model).name} has a fixed batch size of {fixed} "
                                     f"(input {spec.name!r})",
                                     hint=f"drop --batch to measure batch {fixed}, or export the model with a dynamic batch dim")
            feed = random_feed(runner.input_specs, batch=args.batch or 1, shapes=shapes, seed=args.seed)
            batch = feed_batch(feed)
            if is_engine and (trt_options or args.no_transfers):
                times = runner.time_device(feed, iterations=args.iterations, warmup=args.warmup,  # type: ignore[attr-defined]
                                           cuda_graph=args.cuda_graph, streams=args.streams, duration_s=args.duration)
                stats = stats_from_times(times, backend=runner.backend, device=runner.device, batch=batch * args.streams)
                mode = "inputs on the GPU" + (", CUDA graph" if args.cuda_graph else "") + \
                    (f", {args.streams} streams" if args.streams > 1 else "")
            else:
                stats = measure_latency(runner, feed, warmup=args.warmup, iterations=args.iterations,
                                        duration_s=args.duration)
                mode = "host to host (inputs copied in, outputs copied out)" if is_engine else "host arrays"
        if args.json:  # written before anything is printed
            write_json_atomic(args.json, {"model": str(args.model), "mode": mode, **stats.to_dict()})
        shape_text = ", ".join(f"{n} {'x'.join(map(str, a.shape))}" for n, a in feed.items())
        print(f"{Path(args.model).name} on {stats.backend} ({stats.device}); {shape_text}; {mode}")
        print(f"  {stats.iterations} runs: min {stats.min_ms:.3f} ms, median {stats.median_ms:.3f}, mean {stats.mean_ms:.3f}, "
              f"p90 {stats.p90_ms:.3f}, p99 {stats.p99_ms:.3f}; throughput {stats.throughput:.1f} samples/s")
        if args.json:
            print(f"  wrote {args.json}")
        return 0
