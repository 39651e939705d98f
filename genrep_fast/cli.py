"""``genrep-fast``: the command line of the GenRep trainer (also ``python -m genrep_fast``).

    genrep-fast demo --out DIR [--ablation] [--resume | --overwrite]   both stages on the
                                                    embedded digits + report
    genrep-fast train [--config NAME|PATH] [--set key=value ...] [--out DIR] [--resume PATH]
                      [--allow-config-change] [--overwrite]
    genrep-fast eval --checkpoint RUN_OR_CKPT [--out DIR]
    genrep-fast sample --checkpoint RUN_OR_CKPT --out samples.png [--per-class N] [--steps N]
                       [--guidance-scale S]
    genrep-fast classify --checkpoint RUN_OR_CKPT IMAGE [IMAGE ...]
    genrep-fast encode [--config NAME|PATH] [--set key=value ...] --out DIR [--shard-size N]
                       encode the config's images with model.vae into latent shards
    genrep-fast bench [--benchmark] [pytest args]   run bench/ and print the results table
    genrep-fast check-build [--require-cuda]        is the compiled extension there, kernels and all
    genrep-fast config show [NAME|PATH]             every config key: value, default, help
    genrep-fast --version

Latent space: with ``model.vae`` (a local diffusers AutoencoderKL / VQModel folder) ``train``
encodes pixel data on the fly and ``sample``/``eval`` decode samples through the VAE; ``encode``
writes the latents once (``DIR/train``, ``DIR/test``) for ``data.kind: latents``.

Multi-GPU / multi-node: ``torchrun --nproc_per_node=8 -m genrep_fast train --config ...``.
Exit codes: 0 done, 1 check-build found the extension missing or incomplete, 2 bad arguments or
config (also a resume whose config changes the run), 3 bad checkpoint, 4 training stopped after
``runtime.max_bad_steps`` consecutive steps with a non-finite loss or gradient, 128+signal after
SIGTERM/SIGINT (a checkpoint was written first). ``eval``, ``sample`` and ``classify`` only read
the run folder. Before anything is trained or written, ``genrep_fast.train.preflight`` checks the
device, optional packages, data against the model, and output folders (one-line errors, exit 2);
``demo`` / ``train`` refuse a non-empty ``--out`` unless ``--resume`` or ``--overwrite``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny_digits", help="bundled config name or YAML path")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set stage2.steps=100 (repeatable)",
    )


EXIT_CODES = (
    "exit codes: 0 done; 2 bad arguments or config (also a resume whose config changes the run); "
    "3 bad checkpoint; 4 stopped after runtime.max_bad_steps consecutive steps with a non-finite "
    "loss or gradient; 128+signal after SIGTERM/SIGINT (a checkpoint was written first)"
)


OVERWRITE_HELP = (
    "start over in a non-empty --out: delete the files a run writes there (checkpoints/, "
    "metrics.jsonl, config.json, ...) first; other files stay"
)


def _set_arg(p: argparse.ArgumentParser, what: str = "the config") -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a value of {what}, e.g. --set runtime.device=cpu (repeatable; "
        "`genrep-fast config show` lists the keys)",
    )


def _parser() -> argparse.ArgumentParser:
    from genrep_fast import __version__

    ap = argparse.ArgumentParser(
        prog="genrep-fast", description=__doc__.split("\n\n")[0], epilog=EXIT_CODES
    )
    ap.add_argument("--version", action="version", version=f"genrep-fast {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train both stages of tiny_digits and write a report")
    p.add_argument(
        "--out", default="genrep-demo", help="output folder (the run itself goes to OUT/run)"
    )
    p.add_argument("--ablation", action="store_true", help="also run the paper's ablation rows")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="ablation: seeds per row (mean +- sd), all from one shared stage-0 model",
    )
    _set_arg(p, "the tiny_digits config")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--resume", action="store_true", help="continue the run in OUT/run from its checkpoint"
    )
    g.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = sub.add_parser("train", help="train from a config", epilog=EXIT_CODES)
    _config_args(p)
    p.add_argument("--out", default=None, help="run folder (default: the config's out_dir)")
    p.add_argument(
        "--resume",
        default=None,
        help="checkpoint or run folder to continue from (a run folder: its latest intact one)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though the config changes seed, data.batch_size, diffusion.*, model.* "
        "or another run-defining key (refused otherwise, exit code 2)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the held-out set")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument(
        "--out",
        default=None,
        help="folder for eval.json, reliability.png and samples.png "
        "(default: ./eval-<checkpoint name>)",
    )
    _set_arg(p, "the checkpoint's config")

    p = sub.add_parser("sample", help="draw class-conditional samples into a grid PNG")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument(
        "--out", default="samples.png", help="image file of the grid (its folder must exist)"
    )
    p.add_argument(
        "--per-class", type=int, default=10, help="samples per class (one grid row per class)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="reverse-chain steps (default: the config's eval.sample_steps or diffusion.num_steps)",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance with the null class; 1 (default) is none",
    )

    p = sub.add_parser(
        "classify", help="classify image files with the head: the top 3 class names per image"
    )
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", help="image files (resized like the training data)")

    p = sub.add_parser(
        "encode",
        help="encode the config's images with model.vae into latent shards (data.kind: latents)",
        description="Encode the training (and held-out) images of a config with its model.vae "
        "into safetensors shards, DIR/train/shard-NNNNN.safetensors and DIR/test/..., in the "
        "'latents' data format (scaled latents: train with data.latent_scale=1). Row i of the "
        "shards is image i of the folder; data.augment is not applied.",
        epilog=EXIT_CODES,
    )
    _config_args(p)
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder (its train/ and test/ must not hold shards)",
    )
    p.add_argument("--shard-size", type=int, default=4096, help="latents per shard file")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE call")

    p = sub.add_parser("bench", help="run the benchmark suites (pytest bench/) and print the table")
    p.add_argument("--benchmark", action="store_true", help="realistic shapes, results saved")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed on to pytest (after --)")

    p = sub.add_parser(
        "check-build", help="list the kernels of the compiled extension; fail when it is missing"
    )
    p.add_argument("--require-cuda", action="store_true", help="fail unless CUDA kernels are built")

    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser(
        "show", help="print every config key with its value, its default and its help"
    )
    c.add_argument(
        "name",
        nargs="?",
        default=None,
        help="bundled config name or YAML path (default: the schema's defaults)",
    )
    _set_arg(c)
    return ap


CHECKPOINT_HELP = "a checkpoint folder, or a run folder (its latest intact checkpoint)"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-build":
        from genrep_fast import check_build

        return check_build.main(["--require-cuda"] if args.require_cuda else [])
    from genrep_fast.train.checkpoint import CheckpointError
    from genrep_fast.train.config import ConfigError
    from genrep_fast.train.trainer import TrainingDiverged

    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"genrep-fast: config error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"genrep-fast: checkpoint error: {exc}", file=sys.stderr)
        return 3
    except TrainingDiverged as exc:
        print(f"genrep-fast: {exc}", file=sys.stderr)
        return TrainingDiverged.exit_code


def _dispatch(args) -> int:
    from genrep_fast.train.trainer import TrainingInterrupted

    cmd = args.command
    if cmd == "bench":
        root = Path(__file__).resolve().parents[1]
        if not (root / "bench").is_dir():
            print(
                f"genrep-fast bench: no bench/ folder beside the package ({root}); the suites ship "
                "with the source tree: clone it and `pip install -e .[test] --no-build-isolation`",
                file=sys.stderr,
            )
            return 2
        if importlib.util.find_spec("pytest") is None:
            print(
                "genrep-fast bench: pytest is not installed; `pip install -e .[test] "
                "--no-build-isolation` installs it with pytest-benchmark",
                file=sys.stderr,
            )
            return 2
        extra = [a for a in args.pytest_args if a != "--"]
        cmd_line = (
            [
                sys.executable,
                "-m",
                "pytest",
                str(root / "bench"),
                "-q",
                "-s",
                "-p",
                "no:cacheprovider",
            ]
            + (["--benchmark"] if args.benchmark else [])
            + extra
        )
        return subprocess.call(cmd_line, cwd=root)
    if cmd == "config":
        from genrep_fast.train.config import (
            TrainConfig,
            apply_overrides,
            config_from_dict,
            load_config,
        )
        from genrep_fast.train.config_help import show

        if args.name is None:
            data = apply_overrides(TrainConfig().to_dict(), args.overrides)
            cfg, name = config_from_dict(data), "defaults"
        else:
            cfg, name = load_config(args.name, args.overrides), args.name
        sys.stdout.write(show(cfg, name))
        return 0
    if cmd == "demo":
        from genrep_fast.train import preflight
        from genrep_fast.train.demo import demo_config, run_demo

        cfg = demo_config(args.out, args.overrides)
        preflight.check_out_dir(args.out, resume=args.resume, overwrite=args.overwrite, demo=True)
        preflight.check_run(cfg)
        if args.overwrite:
            _report_cleared(args.out, preflight.clear_run_folder(args.out, demo=True))
        try:
            if args.seeds < 1:
                print(f"genrep-fast demo: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
                return 2
            res = run_demo(
                args.out,
                args.overrides,
                ablation=args.ablation,
                seeds=args.seeds,
                resume=args.resume,
            )
        except TrainingInterrupted as exc:
            print(f"genrep-fast: {exc}", file=sys.stderr)
            return 128 + int(exc.signum)
        keys = (
            "head_top1",
            "posterior_top1",
            "ece_head",
            "ece_posterior",
            "gen_head_accuracy",
            "stage0_seconds",
            "stage1_seconds",
            "stage2_seconds",
            "wall_seconds",
        )
        print(json.dumps({k: res[k] for k in keys if k in res}, indent=1))
        out = Path(args.out)
        print(f"wrote {out / 'metrics.json'}, reliability.png, samples.png, report.md")
        print(f"report: {out / 'report.md'}")
        print(f"checkpoint: {out / 'run' / 'checkpoints' / 'latest'} (run folder {out / 'run'})")
        return 0
    if cmd == "train":
        from genrep_fast.train import preflight
        from genrep_fast.train.config import load_config
        from genrep_fast.train.evaluation import evaluate
        from genrep_fast.train.trainer import Trainer

        cfg = load_config(args.config, args.overrides)
        out = args.out or cfg.out_dir
        preflight.check_out_dir(out, resume=args.resume is not None, overwrite=args.overwrite)
        preflight.check_run(cfg)
        if args.overwrite:
            _report_cleared(out, preflight.clear_run_folder(out))
        trainer = Trainer(
            cfg, args.out, resume=args.resume, allow_config_change=args.allow_config_change
        )
        try:
            trainer.run()
        except TrainingInterrupted as exc:
            print(f"genrep-fast: {exc}", file=sys.stderr)
            return 128 + int(exc.signum)
        if trainer.rank == 0 and not args.no_eval and trainer.test_set is not None:
            res = evaluate(
                trainer.net, cfg, trainer.test_set, trainer.out_dir, backend=trainer.backend
            )
            (trainer.out_dir / "eval.json").write_text(json.dumps(res, indent=1))
            print(json.dumps(res, indent=1))
        return 0
    if cmd == "encode":
        return _encode(args)
    # eval / sample / classify: read the checkpoint's network only; nothing is written into the
    # run folder and no training data is read.
    from genrep_fast.train import preflight
    from genrep_fast.train.trainer import load_for_inference

    if cmd == "sample":
        preflight.check_output_file(args.out, "sample --out")
    if cmd == "eval" and args.out:
        preflight.check_writable_dir(args.out, "eval --out")
    if cmd == "classify":
        preflight.check_input_files(args.images, "classify")
    overrides = list(getattr(args, "overrides", [])) + ["runtime.progress=false"]
    cfg, net, ckpt_path = load_for_inference(args.checkpoint, overrides)
    if cmd == "eval":
        from genrep_fast.train.data import build_test_dataset
        from genrep_fast.train.evaluation import evaluate

        preflight.check_test_root(cfg)
        test_set = build_test_dataset(cfg.data)
        if test_set is None:
            print("genrep-fast: the config has no held-out set (data.test_root)", file=sys.stderr)
            return 2
        out = Path(args.out) if args.out else Path(f"eval-{ckpt_path.name}")
        backend = "auto" if cfg.runtime.ops == "fast" else "reference"
        res = evaluate(net, cfg, test_set, out, backend=backend)
        (out / "eval.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return 0
    from genrep_fast.pipeline import GenRep

    model = GenRep(net, cfg)
    if cmd == "sample":
        import torch

        from genrep_fast.train.metrics import image_grid

        labels = torch.arange(model.num_classes).repeat_interleave(args.per_class)
        g = torch.Generator(model.device).manual_seed(args.seed)
        try:
            x = model.sample(
                labels,
                steps=args.steps,
                guidance_scale=args.guidance_scale,
                generator=g,
                progress=True,
            )
        except ValueError as exc:  # --steps / --guidance-scale out of range
            print(f"genrep-fast sample: {exc}", file=sys.stderr)
            return 2
        x = _decoded(cfg, x)
        image_grid(
            x,
            args.per_class,
            args.out,
            scale=max(1, 64 // x.shape[-1]),
            row_labels=model.class_names,
        )
        print(f"wrote {args.out}")
        return 0
    if cmd == "classify":
        import torch

        from genrep_fast.train.latent_space import LatentSpace

        images = args.images
        space = LatentSpace.from_config(cfg, model.device)
        if space is not None:  # a latent model: images at the VAE's resolution, then encoded
            from PIL import Image

            from genrep_fast.train.data import image_tensor

            size, grey = model.latent_shape[1] * space.downsample, space.image_channels == 1
            try:
                pixels = []
                for f in args.images:
                    with Image.open(f) as im:
                        pixels.append(image_tensor(im, size, grayscale=grey))
            except OSError as exc:
                print(f"genrep-fast classify: cannot read image: {exc}", file=sys.stderr)
                return 2
            images = space.encode(torch.stack(pixels).to(model.device))
        try:
            result = model.classify(images)
        except (ValueError, TypeError) as exc:  # an unreadable image, a latent model
            print(f"genrep-fast classify: {exc}", file=sys.stderr)
            return 2
        for f, top in zip(args.images, result.top(3)):
            print(f"{f}: " + ", ".join(f"{name} ({p:.3f})" for name, p in top))
        return 0
    raise AssertionError(cmd)


def _decoded(cfg, x):
    """Samples of a latent model (``model.vae``) decoded to pixels; others as they are."""
    from genrep_fast.train.latent_space import LatentSpace

    space = LatentSpace.from_config(cfg, x.device)
    return x if space is None else space.decode(x)


def _encode(args) -> int:
    """``genrep-fast encode``: the config's pixel data through model.vae into latent shards."""
    import dataclasses

    from genrep_fast.train.config import ConfigError, load_config
    from genrep_fast.train.data import build_datasets
    from genrep_fast.train.latent_space import PIXEL_KINDS, LatentSpace, encode_dataset
    from genrep_fast.train.trainer import resolve_device

    if args.shard_size < 1 or args.batch_size < 1:
        bad = "--shard-size" if args.shard_size < 1 else "--batch-size"
        raise ConfigError(f"{bad}: must be >= 1")
    cfg = load_config(args.config, args.overrides)
    if not cfg.model.vae:
        raise ConfigError("model.vae: encode needs a VAE folder (--set model.vae=PATH)")
    if cfg.data.kind not in PIXEL_KINDS:
        raise ConfigError(
            f"data.kind: encode reads images ({' or '.join(PIXEL_KINDS)}), got {cfg.data.kind!r}"
        )
    out = Path(args.out)
    for part in ("train", "test"):
        if any((out / part).glob("*.safetensors")):
            raise ConfigError(f"--out: {out / part} already holds shards; choose an empty folder")
    if cfg.runtime.threads:
        import torch

        torch.set_num_threads(cfg.runtime.threads)
    space = LatentSpace.from_config(cfg, resolve_device(cfg.runtime.device))
    train, test = build_datasets(dataclasses.replace(cfg.data, augment=False), cfg.seed)
    written = {}
    for part, dataset in (("train", train), ("test", test)):
        if dataset is None:
            continue
        paths = encode_dataset(
            space,
            dataset,
            out / part,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            num_workers=cfg.data.num_workers,
            progress=cfg.runtime.progress,
        )
        written[part] = (len(dataset), len(paths))
        print(f"wrote {len(dataset)} latents in {len(paths)} shards to {out / part}")
    sets = [f"--set data.kind=latents --set data.root={out / 'train'}"]
    if "test" in written:
        sets.append(f"--set data.test_root={out / 'test'}")
    print("train from them with: " + " ".join(sets) + " --set data.latent_scale=1")
    return 0


def _report_cleared(out, removed: list[str]) -> None:
    if removed:
        print(f"genrep-fast: --overwrite removed {', '.join(removed)} from {out}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
