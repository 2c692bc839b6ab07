"""`dsv3-quantize`: a float (BF16 / FP32) or FP8 DeepSeek-V3/R1 HF folder -> an msModelSlim-layout W8A8 folder.

    dsv3-quantize INPUT OUTPUT --calib TEXT.jsonl [--tokenizer FILE_OR_DIR]
                  [--smooth none|smoothquant|outlier-suppression+] [--alpha 0.5]
                  [--samples 32] [--seq-len 256] [--no-mtp] [--config CONFIG.json] [--quiet]

The DeepSeek recipe (attention q_a / kv_a / q_b / o static W8A8, kv_b FLOAT, all of mlp W8A8_DYNAMIC, router,
embeddings, norms, lm_head and the MTP layer FLOAT), calibrated on the text (one {"text": ...} per line),
layer by layer. Exit status: 0 done, 1 error (bad input, a full disk, an output folder in use: one line on
stderr), 2 usage, 130 interrupted (rerun the same command to resume).
"""
import argparse
import sys

from mindformers_dsv3.checkpoint.errors import CheckpointError

SMOOTH_CHOICES = ("none", "smoothquant", "outlier-suppression+")  # = quantize.SMOOTH_CHOICES (checked there)


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _alpha(text):
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def build_parser():
    p = argparse.ArgumentParser(prog="dsv3-quantize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="HF folder, BF16 / FP32 or FP8 (never modified)")
    p.add_argument("output", help="output folder: new or empty, or the folder of an interrupted run of the same "
                   "command (it resumes); not inside the input")
    p.add_argument("--calib", required=True, metavar="JSONL", help='calibration text, one {"text": ...} per line')
    p.add_argument("--tokenizer", help="tokenizer.json (or a folder holding it); default: the input folder's")
    p.add_argument("--smooth", choices=SMOOTH_CHOICES, default="outlier-suppression+",
                   help="smoothing of the static attention inputs (default outlier-suppression+: scale and shift)")
    p.add_argument("--alpha", type=_alpha, default=0.5, help="smoothing strength (default 0.5)")
    p.add_argument("--samples", type=_positive, default=32, help="calibration rows (default 32)")
    p.add_argument("--seq-len", type=_positive, default=256, help="tokens per calibration row (default 256)")
    p.add_argument("--no-mtp", action="store_true", help="drop the multi-token-prediction layer")
    p.add_argument("--config", help="config.json to use instead of INPUT/config.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug-kill-at", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _error(text):
    print(f"dsv3-quantize: {text}", file=sys.stderr)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        from mindformers_dsv3.quant import quantize_run  # after parsing: --help stays instant
        summary = quantize_run.quantize(args.input, args.output, args.calib, tokenizer=args.tokenizer,
                                        smooth=args.smooth, alpha=args.alpha, samples=args.samples,
                                        seq_len=args.seq_len, include_mtp=not args.no_mtp, config_path=args.config,
                                        progress=not args.quiet, kill_at=args.debug_kill_at)
        print(quantize_run.format_summary(summary))
        return 0
    except CheckpointError as exc:
        _error(f"error: {exc}")
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"error: {where}{exc.strerror or exc}")
        return 1
    except KeyboardInterrupt:
        _error("interrupted: finished layers are kept in the manifest; rerun the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
