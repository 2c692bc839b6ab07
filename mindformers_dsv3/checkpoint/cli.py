"""`dsv3-convert`: DeepSeek-V3/R1 checkpoints between HuggingFace and MindSpore layouts.

    dsv3-convert hf-to-ms    HF_DIR MS_DIR  [--dtype bf16|fp16|fp32] [--no-mtp] [--workers N] [--layout YAML]
    dsv3-convert ms-to-hf    MS_DIR HF_DIR  [--dtype keep|bf16|fp16|fp32] [--no-mtp] [--workers N]
    dsv3-convert fp8-to-bf16 HF_DIR OUT_DIR [--dtype bf16|fp16|fp32] [--no-mtp] [--workers N]
    dsv3-convert check       DIR

Also `python -m mindformers_dsv3.checkpoint ...`. Exit status: 0 done, 1 error (bad input, a full disk,
an output folder in use: one line on stderr), 2 usage, 130 interrupted (Ctrl-C: rerun the same command to resume).
"""
import argparse
import sys

from .errors import CheckpointError

_MODES = {
    "hf-to-ms": ("HuggingFace folder (FP8 or BF16) -> MindSpore safetensors in our layout",
                 ("bf16", "fp16", "fp32"), "bf16"),
    "ms-to-hf": ("MindSpore folder written by hf-to-ms -> HuggingFace folder transformers loads",
                 ("keep", "bf16", "fp16", "fp32"), "keep"),
    "fp8-to-bf16": ("HuggingFace FP8 folder -> HuggingFace BF16 folder (quantization_config removed)",
                    ("bf16", "fp16", "fp32"), "bf16"),
}


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="dsv3-convert", description="Convert DeepSeek-V3/R1 checkpoints in one streaming pass: "
        "tensor by tensor, resumable after a kill (rerun the same command), byte-identical for any --workers.")
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode, (help_text, dtypes, default) in _MODES.items():
        p = sub.add_parser(mode, help=help_text, description=help_text)
        p.add_argument("input", help="input folder (never modified)")
        p.add_argument("output", help="output folder: new or empty, or the folder of an interrupted run "
                       "of the same command (it resumes); not inside the input")
        p.add_argument("--dtype", choices=dtypes, default=default,
                       help=f"output dtype of the weights (default {default}; router biases stay float32"
                       + ("; 'keep' writes the input's dtypes" if "keep" in dtypes else "") + ")")
        p.add_argument("--no-mtp", action="store_true",
                       help="drop the multi-token-prediction layer (MTP tensors in the input are ignored)")
        p.add_argument("--workers", type=_positive, default=1,
                       help="processes writing files in parallel (output identical for every value)")
        p.add_argument("--config", help="config.json to use instead of INPUT/config.json")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if mode == "hf-to-ms":
            p.add_argument("--layout", metavar="YAML",
                           help="a MindFormers YAML whose parallel_config (and run_mode, offset) gives the ranks: "
                           "write each rank's slices to OUTPUT/rank_<r>/ (own index and config.json), which the "
                           "model loads for its rank")
        p.add_argument("--debug-kill-after", type=int, default=None, help=argparse.SUPPRESS)
        p.add_argument("--debug-stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p = sub.add_parser("check", help="verify a folder against its manifest (names, shapes, dtypes, sizes, sha256)",
                       description="Verify a converted folder against its manifest: every file's size and "
                       "sha256, every tensor's name, dtype and shape, and the index. A folder without a "
                       "manifest (e.g. a HuggingFace download) gets a structural check of index and headers.")
    p.add_argument("folder")
    return parser


def _error(text):
    print(f"dsv3-convert: {text}", file=sys.stderr)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        from . import transform  # after parsing: --help stays instant
        if args.mode == "check":
            result = transform.check(args.folder)
            print(f"check: {args.folder}: OK, {result['files']} files, {result['tensors']:,} tensors "
                  f"verified ({result['verified']})")
            return 0
        summary = transform.convert(args.mode, args.input, args.output, dtype=args.dtype,
                                    include_mtp=not args.no_mtp, workers=args.workers,
                                    config_path=args.config, progress=not args.quiet,
                                    kill_at=args.debug_kill_after, stop_at=args.debug_stop_after,
                                    layout=getattr(args, "layout", None))
        print(transform.format_summary(summary))
        return 0
    except CheckpointError as exc:
        _error(f"error: {exc}")
        return 1
    except OSError as exc:  # not from a checkpoint file (those are CheckpointErrors): the disk, a folder
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"error: {where}{exc.strerror or exc}")
        return 1
    except KeyboardInterrupt:
        _error("interrupted" + ("" if args.mode == "check" else
                                ": finished files are kept in the manifest; rerun the same command to resume"))
        return 130


if __name__ == "__main__":
    sys.exit(main())
