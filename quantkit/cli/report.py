from __future__ import annotations

import argparse


class Report:
    """Plots (PNG + SVG) and one self-contained HTML page from result JSON files (needs matplotlib).

    Takes the JSON of `calibrate` (ranges.json, report.json), `compare --json`, `bench --json`,
    `qat-demo` (results.json) and `debug` (debug.json), or folders holding them. Accuracy vs latency is drawn for the
    models that have both a comparison and a benchmark, matched by file name.

    example:
      quantkit compare m.onnx out/m.int8.onnx --images val --json r/cmp.json
      quantkit bench m.onnx --json r/fp32.json && quantkit bench out/m.int8.onnx --json r/int8.json
      quantkit report r/ out/ranges.json -o report/
    """

    name = "report"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("results", nargs="+", metavar="FILE_OR_DIR", help="result JSON files or folders")
        parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for index.html and the plots")
        parser.add_argument("--title", default="quantkit report", help="page title (default: %(default)s)")
        parser.add_argument("--force", action="store_true",
                            help="replace the files of an earlier report in the output folder (never other files)")

    def run(self, args: argparse.Namespace) -> int:
        from quantkit._io import check_output_dir
        from quantkit.report import load_results, write_report

        check_output_dir(args.output, force=args.force, inputs=args.results, command="quantkit report")
        res = load_results(args.results)
        paths = write_report(res, args.output, title=args.title, force=args.force, inputs=args.results)
        print(f"{len(res.compares)} comparisons, {len(res.benches)} benchmarks, {len(res.ranges)} range sets, "
              f"{len(res.qat)} QAT runs, {len(res.debug)} debug runs")
        for p in paths.values():
            print(f"  wrote {p}")
        return 0
