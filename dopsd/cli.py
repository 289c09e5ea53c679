"""The `dopsd` command line: train a round, sample previews, build tiny models, run the demo."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from dopsd.config import TrainConfig, field_docs, field_types, make_config, preset_names

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)


def _option_type(kind: Any) -> Any:
    # Literal choices and bools pass through as strings and are validated by config.coerce, with a clear error.
    return str if get_args(kind) or kind is bool else kind


def _train_command(preset: str | None = None, **overrides: Any) -> None:
    from dopsd.train import train

    config = make_config(preset, **overrides)
    missing = [name for name in ("model", "data") if not getattr(config, name)]
    if missing:
        raise typer.BadParameter(f"--{' and --'.join(missing)} required (directly or from the preset)")

    def show(step: int, metrics: dict[str, float]) -> None:
        typer.echo(json.dumps({"step": step, **metrics}))

    adapter = train(config, on_metrics=show)
    typer.echo(f"adapter written to {adapter}")


def _build_train_signature() -> inspect.Signature:
    docs, types = field_docs(TrainConfig), field_types(TrainConfig)
    params = [
        inspect.Parameter(
            "preset",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                str | None, typer.Option(help=f"Preset: {', '.join(preset_names())} or a .toml path.")
            ],
        )
    ]
    for f in dataclasses.fields(TrainConfig):
        kind = types[f.name]
        choices = get_args(kind)
        help_text = docs.get(f.name, "") + (f" [{'|'.join(choices)}]" if choices else "")
        help_text += f" (default {f.default!r})"
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[_option_type(kind) | None, typer.Option(help=help_text, show_default=False)],
            )
        )
    return inspect.Signature(params)


_train_command.__signature__ = _build_train_signature()  # type: ignore[attr-defined]
app.command("train", help="Run (or resume) a fine-tuning round: D-OPSD or the SFT baseline.")(_train_command)


@app.command()
def sample(
    model: Annotated[str, typer.Option(help="Pipeline folder or hub id.")],
    prompt: Annotated[list[str], typer.Option(help="Prompt (repeat for several).")],
    adapter: Annotated[str | None, typer.Option(help="Adapter folder a round wrote (LoRA, learnt words).")] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps (the deployed setting).")] = 4,
    seeds: Annotated[str, typer.Option(help="Seeds, e.g. 0-7 or 0,3,5.")] = "0-7",
    resolution: Annotated[int, typer.Option(help="Square image size.")] = 1024,
    guidance: Annotated[float, typer.Option(help="Guidance scale (0 for distilled models).")] = 0.0,
    family: Annotated[str, typer.Option(help="auto | zimage | flux2-klein")] = "auto",
    text_encoder_layers: Annotated[str, typer.Option(help="FLUX.2-klein: hidden layers to stack.")] = "",
    out: Annotated[Path, typer.Option(help="PNG grid to write (rows: prompts, columns: seeds).")] = Path("samples.png"),
) -> None:
    """Sample a PNG grid with the real pipeline at the deployed setting, with or without an adapter."""
    from dopsd.preview import parse_seeds, sample_grid

    grid = sample_grid(
        model, prompt, parse_seeds(seeds), steps, resolution, guidance, adapter, family, text_encoder_layers
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    typer.echo(f"wrote {out} ({len(prompt)} prompts x {len(parse_seeds(seeds))} seeds, {steps} steps)")


@app.command("build-tiny")
def build_tiny(
    out: Annotated[Path, typer.Option(help="Folder to write the pipeline to.")],
    family: Annotated[str, typer.Option(help="zimage | flux2-klein")] = "zimage",
    seed: Annotated[int, typer.Option(help="Init seed.")] = 0,
) -> None:
    """Build a tiny random pipeline of a real family locally (no hub), for tests and trials."""
    from dopsd.models.tiny import build_tiny_flux2_klein, build_tiny_zimage

    builder = {"zimage": build_tiny_zimage, "flux2-klein": build_tiny_flux2_klein}[family]
    typer.echo(f"built {builder(out, seed=seed)}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its round and evaluation.")] = Path("runs/demo"),
    model: Annotated[str, typer.Option(help="The nano base.")] = "data/nano/model",
    world: Annotated[Path, typer.Option(help="The nano world (prompts and concept packs).")] = Path("data/nano/world"),
    pack: Annotated[str, typer.Option(help="Concept pack to learn.")] = "star",
    steps: Annotated[int, typer.Option(help="Training steps (0: the preset's).")] = 0,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field of the nano preset, repeatable: --set lr=1e-3.")
    ] = None,
) -> None:
    """Teach the nano base a concept pack with a D-OPSD round (keeping the base with caption negatives that drop the
    pack's word and replayed world renders, their top states anchored; `--set anchor_layout=0 --set replay_ratio=0
    --set negative_ratio=0` for none; `--set lora_rank=0 --set learn_words=star=object,stars=objects` learns the
    word alone, which needs none of them; `striped=@images` starts a word from its images), then score base and
    adapter at 4 steps: the new concept's accuracy, retention of held-out base prompts, the concept's leak onto
    them, side-by-side grids."""
    from dopsd.config import parse_overrides

    try:
        overrides = parse_overrides(set_ or [])
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--set") from None
    if not (Path(model) / "model_index.json").is_file():
        raise typer.BadParameter(
            f"{model} holds no pipeline (model_index.json): give the nano base, which `dopsd nano bootstrap "
            "--export-to` writes",
            param_hint="--model",
        )
    from dopsd.demo import run_nano_demo  # torch and diffusers: seconds, so only once the options are known good

    for line in run_nano_demo(workdir, model, world, pack, steps, overrides=overrides):
        typer.echo(line)


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(help="Pipeline folder or hub id.")],
    candidate: Annotated[str | None, typer.Option(help="Candidate LoRA folder.")] = None,
    baseline: Annotated[
        str | None, typer.Option(help="Baseline LoRA folder (the champion; default: the base).")
    ] = None,
    geneval: Annotated[Path | None, typer.Option(help="GenEval metadata (.jsonl) of prompts to retain.")] = None,
    references: Annotated[Path | None, typer.Option(help="Real images for FID against references.")] = None,
    concept: Annotated[Path | None, typer.Option(help="The concept's data folder (images + captions).")] = None,
    concept_prompts: Annotated[Path | None, typer.Option(help="New-scene prompts for the concept.")] = None,
    limit: Annotated[int, typer.Option(help="Use the first N prompts of each GenEval task of each set (0: all).")] = 0,
    steps: Annotated[int, typer.Option(help="Sampling steps (the deployed setting).")] = 4,
    images_per_prompt: Annotated[int, typer.Option(help="Images per prompt (seeds seed..seed+N-1).")] = 4,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    resolution: Annotated[int, typer.Option(help="Square image size.")] = 1024,
    batch: Annotated[int, typer.Option(help="Images per sampling batch.")] = 16,
    detector: Annotated[str, typer.Option(help="GenEval detector: nano or a Mask2Former folder.")] = "",
    clip: Annotated[str, typer.Option(help="CLIP: nano or an open_clip .safetensors file.")] = "",
    clip_arch: Annotated[str, typer.Option(help="open_clip architecture of --clip.")] = "ViT-H-14",
    fid: Annotated[str, typer.Option(help="FID features: nano or Inception .safetensors weights.")] = "",
    dino: Annotated[str, typer.Option(help="DINOv2 folder for DINO concept fidelity.")] = "",
    nano: Annotated[bool, typer.Option(help="Use the nano world's networks wherever none is given.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    out: Annotated[Path, typer.Option(help="Report folder (report.json, grids/, verdicts/).")] = Path("runs/eval"),
) -> None:
    """Compare the candidate, the baseline and the base on the same prompts and seeds at the deployed step count:
    GenEval, CLIPScore, FID and concept fidelity, with deltas against the baseline and side-by-side grids."""
    from dopsd.models import load_model
    from evaluation.networks import NetworkPaths, load_networks
    from evaluation.prompt_sets import concept_sets, retention_set
    from evaluation.suite import SuiteConfig, run_suite

    chosen = {"detector": detector, "clip": clip, "fid": fid}
    defaults = NetworkPaths.nano() if nano else NetworkPaths()
    paths = NetworkPaths(
        **{k: v or getattr(defaults, k) for k, v in chosen.items()},
        clip_arch=clip_arch,
        dino=dino,
        fid_cache=str(out / "fid_cache"),
        device=device,
    )
    prompt_sets = [retention_set(geneval, references, limit)] if geneval else []
    if concept:
        prompt_sets += concept_sets(concept, concept_prompts, limit)
    if not prompt_sets:
        raise typer.BadParameter("give --geneval and/or --concept: there is nothing to evaluate on")
    adapters = {"base": None, "baseline": baseline, "candidate": candidate}
    adapters = {name: path for name, path in adapters.items() if name == "base" or path}
    config = SuiteConfig(steps, images_per_prompt, seed, resolution, batch, baseline="baseline" if baseline else "base")
    fewstep = load_model(model, device=device, with_teacher_encoder=False)
    report = run_suite(fewstep, adapters, prompt_sets, load_networks(paths), config, out, progress=True)
    for name, values in report.metrics.items():
        shown = {k: round(v, 4) if v is not None else None for k, v in values.items()}
        typer.echo(f"{name}: {json.dumps(shown)}")
    for name, intervals in report.intervals.items():
        if name == config.baseline:
            continue
        for metric, (low, high) in intervals.items():
            delta = report.deltas[name][metric]
            typer.echo(
                f"{name} - {config.baseline} {metric}: {delta:+.4f} (95% over prompts {low:+.4f} .. {high:+.4f})"
            )
    for metric, reason in report.unavailable.items():
        typer.echo(f"unavailable {metric}: {reason}")
    typer.echo(f"report: {out / 'report.json'}")


nano_app = typer.Typer(help="The nano world: the embedded few-step model and its data.", no_args_is_help=True)
app.add_typer(nano_app, name="nano")


@nano_app.command("bootstrap")
def nano_bootstrap(
    workdir: Annotated[Path, typer.Option(help="Checkpoints and the model being built.")] = Path("runs/nano-bootstrap"),
    stage: Annotated[
        list[str] | None,
        typer.Option(help="Stage(s) to run: vae, vision, pretrain, distill, distill_on_policy (default all)."),
    ] = None,
    vae_steps: Annotated[int | None, typer.Option(help="VAE steps.")] = None,
    vision_steps: Annotated[int | None, typer.Option(help="Vision tower steps.")] = None,
    pretrain_steps: Annotated[int | None, typer.Option(help="Pretraining steps.")] = None,
    distill_steps: Annotated[int | None, typer.Option(help="Distillation steps.")] = None,
    on_policy_steps: Annotated[int | None, typer.Option(help="On-policy distillation steps.")] = None,
    curate_distill: Annotated[
        bool,
        typer.Option(
            help="Straight-line distillation learns only the teacher endpoints the nano detector finds right."
        ),
    ] = False,
    threads: Annotated[int, typer.Option(help="CPU threads.")] = 2,
    device: Annotated[str, typer.Option(help="cuda or cpu (default: cuda when available).")] = "",
    data_workers: Annotated[
        int,
        typer.Option(help="Processes preparing pretraining batches (0: the training process; on a GPU: ~cores - 2)."),
    ] = 0,
    compile_blocks: Annotated[
        bool, typer.Option("--compile/--no-compile", help="Compile the transformer's repeated blocks.")
    ] = True,
    export_to: Annotated[Path | None, typer.Option(help="Copy the finished model folder here.")] = None,
) -> None:
    """Build the nano model: VAE, teacher vision tower, pretraining, distillation to 4 steps (straight-line, then
    on-policy). Resumes from the work folder's newest checkpoints, so it can run in the background over several
    sittings."""
    from dopsd.nano.bootstrap import STAGES, BootstrapConfig, bootstrap, export
    from evaluation.nano.detector import NanoDetector
    from evaluation.nano.geneval_nano import rules_judge

    steps = {
        "vae": vae_steps,
        "vision": vision_steps,
        "pretrain": pretrain_steps,
        "distill": distill_steps,
        "distill_on_policy": on_policy_steps,
    }
    chosen: dict[str, Any] = {f"{k}_steps": v for k, v in steps.items() if v is not None}
    config = BootstrapConfig(
        workdir=str(workdir),
        threads=threads,
        device=device,
        data_workers=data_workers,
        compile=compile_blocks,
        curate_distill=curate_distill,
        **chosen,
    )
    unknown = sorted(set(stage or ()) - set(STAGES))
    if unknown:
        raise typer.BadParameter(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    judge = rules_judge(NanoDetector.load()) if config.curate_on_policy or config.curate_distill else None
    model_dir = bootstrap(config, tuple(stage) if stage else None, log=typer.echo, judge=judge)
    if export_to:
        typer.echo(f"model exported to {export(config, export_to)}")
    else:
        typer.echo(f"model in {model_dir}")


@nano_app.command("world")
def nano_world(
    out: Annotated[Path, typer.Option(help="Folder for prompt sets and concept packs.")] = Path("data/nano/world"),
    per_task: Annotated[int, typer.Option(help="Held-out base prompts per GenEval task.")] = 20,
    pack_images: Annotated[int, typer.Option(help="Images per concept pack (at most 64).")] = 48,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    every_colour: Annotated[
        bool,
        typer.Option(
            help="Pack captions name every object's colour; --no-every-colour leaves half of them out (the caption "
            "ablation of reports/nano_science_sparse_captions.md: the same images, sparser captions)."
        ),
    ] = True,
) -> None:
    """Write the world's held-out GenEval-nano prompts and its concept packs (landing folders + their prompts)."""
    from dopsd.nano.packs import PACKS, write_pack, write_pack_prompts
    from dopsd.nano.scenes import prompt_set, write_jsonl
    from dopsd.nano.world import Vocabulary

    write_jsonl(prompt_set(Vocabulary(), per_task, seed), out / "base_prompts.jsonl")
    for pack in PACKS:
        write_pack(pack, out / "packs" / pack.name, pack_images, seed, every_colour)
        write_pack_prompts(pack, out / "packs" / f"{pack.name}_prompts.jsonl")
    typer.echo(f"wrote base prompts and {len(PACKS)} concept packs to {out}")


@nano_app.command("detector")
def nano_detector(
    out: Annotated[Path | None, typer.Option(help="Weights file (default: the packaged one).")] = None,
    train_scenes: Annotated[int, typer.Option(help="Renders to train on.")] = 8000,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 12,
    validation_scenes: Annotated[int, typer.Option(help="Held-out renders to validate on.")] = 1000,
    metrics: Annotated[Path | None, typer.Option(help="Write the validation as JSON here.")] = None,
) -> None:
    """Train the nano world's detector on renders and validate it on held-out renders."""
    import dataclasses as dc

    from evaluation.nano.detector import DEFAULT_WEIGHTS
    from evaluation.nano.train_detector import build_detector, validate, world_scenes

    detector = build_detector(train_scenes, epochs, log=typer.echo)
    path = detector.save(out or DEFAULT_WEIGHTS)
    result = validate(detector, world_scenes(validation_scenes, seed=12345))
    typer.echo(f"saved {path}; held-out validation: {json.dumps(dc.asdict(result))}")
    if metrics:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.write_text(json.dumps(dc.asdict(result), indent=2))


@nano_app.command("clip")
def nano_clip(
    steps: Annotated[int | None, typer.Option(help="Training steps (default: the packaged recipe's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Weights file (default: the packaged one).")] = None,
    metrics: Annotated[Path, typer.Option(help="Held-out validation as JSON.")] = Path("metrics/nano_clip.json"),
) -> None:
    """Train CLIP-nano (open_clip's CLIP at a tiny config) on renders and captions; validate it on held-out renders."""
    from evaluation.nano.clip import DEFAULT_WEIGHTS, NanoClipTraining, build_and_validate

    config = NanoClipTraining() if steps is None else NanoClipTraining(steps=steps)
    build_and_validate(config, out or DEFAULT_WEIGHTS, metrics, log=typer.echo)


@nano_app.command("report")
def nano_report(
    workdir: Annotated[Path, typer.Option(help="The bootstrap's work folder.")] = Path("runs/nano-bootstrap"),
    prompts: Annotated[Path, typer.Option(help="Held-out GenEval-nano prompts.")] = Path(
        "data/nano/world/base_prompts.jsonl"
    ),
    out: Annotated[Path, typer.Option(help="Markdown report (a .json beside it).")] = Path("reports/nano_base.md"),
    seeds: Annotated[str, typer.Option(help="Seeds per prompt (each prompt and seed has its own noise).")] = "0-7",
) -> None:
    """Measure the nano base: GenEval-nano distilled@4 vs undistilled@4/@32, and the teacher premise per pack."""
    import sys

    from dopsd.preview import parse_seeds
    from evaluation.nano.base_report import write_base_report
    from evaluation.nano.detector import NanoDetector

    command = "dopsd " + " ".join(sys.argv[1:])
    write_base_report(workdir, prompts, NanoDetector.load(), out, command, parse_seeds(seeds))
    typer.echo(out.read_text())


@nano_app.command("probe")
def nano_probe(
    workdir: Annotated[Path, typer.Option(help="The bootstrap's work folder.")] = Path("runs/nano-bootstrap"),
    stage: Annotated[str, typer.Option(help="pretrain or distill.")] = "pretrain",
    prompts: Annotated[Path, typer.Option(help="Held-out GenEval-nano prompts.")] = Path(
        "data/nano/world/base_prompts.jsonl"
    ),
    limit: Annotated[int, typer.Option(help="Prompts per GenEval task.")] = 5,
    seeds: Annotated[str, typer.Option(help="Seeds per prompt.")] = "0-1",
    guidance: Annotated[
        float | None,
        typer.Option(help="Classifier-free guidance (default: the bootstrap's when pretraining, none when distilled)."),
    ] = None,
    premise_prompts: Annotated[int, typer.Option(help="Prompts per concept pack for the teacher premise.")] = 12,
) -> None:
    """Score the newest checkpoint of a running bootstrap (GenEval-nano at 32 and 4 steps, teacher premise per
    pack); the result is appended to the work folder's probes.jsonl."""
    from dopsd.preview import parse_seeds
    from evaluation.nano.base_report import probe_checkpoint, probe_lines
    from evaluation.nano.detector import NanoDetector

    seed_list = parse_seeds(seeds)
    result = probe_checkpoint(
        workdir, stage, prompts, NanoDetector.load(), seed_list, limit, premise_prompts, guidance=guidance
    )
    for line in probe_lines(result, len(seed_list)):
        typer.echo(line)


if __name__ == "__main__":
    app()
