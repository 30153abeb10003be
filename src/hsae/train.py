"""The training loop: Adam with warm-up and decay, the decoder-norm rule, dead-latent tracking,
atomic checkpoints, exact resume, JSON-lines metrics, a live progress bar, and torchrun data
parallelism.

Files in the output folder:
- config.json + weights.safetensors: the model as of the last checkpoint (usable at any time;
  config.json's "step" says which).
- checkpoint.safetensors: model, Adam state, dead-latent counters and RNG state; its metadata holds
  the step and the run record. Written atomically, so a killed run resumes from the last one whole.
- metrics.jsonl: one line per logged step.

Resuming restores everything a step depends on (weights, Adam moments, counters, buffers such as
thresholds and coefficients, the RNG) and the data sources are deterministic in the step, so a
killed-and-resumed run ends with exactly the weights of an uninterrupted one. So that it does,
--resume refuses any option that would change the run (the SAE config, the data's description, the
training options but those in RUN_NEUTRAL_OPTIONS, the number of data-parallel processes), naming
the option and both values; the saved training config stays the run's record.

What a run leaves behind when it fails or is killed: a run stopped before its first checkpoint
leaves the folder as it found it (an error removes what it wrote; after a kill, metrics.jsonl is
started anew by --resume, which then begins at step 0); temporary files of writes a kill
interrupted are removed when a run starts in the folder again; metric lines logged after the
checkpoint a run resumes from are dropped.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from hsae.atomic import check_writable, is_temp_of, remove_stale_temps, write_safetensors, write_text
from hsae.config import SAEConfig, TrainConfig, from_dict, to_dict
from hsae.errors import HsaeError, HsaeWarning, os_error
from hsae.eval.core import fvu
from hsae.models import SAE, SAEOutput, StepContext, get_family
from hsae.models.base import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_memory,
    check_state,
    init_b_dec_geometric_median,
    parameter_count,
    read_config,
    standard_input_scale,
)
from hsae.models.codes import fire_counts, l0_per_row
from hsae.sources.base import ActivationSource
from hsae.version import __version__

CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"
INIT_SAMPLE_ROWS = 16384
# The files a run writes into its folder; the temporary files of their atomic writes, left by a
# killed process, are cleared when a run starts there again.
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, CHECKPOINT_FILE, METRICS_FILE)
# Training options a resumed run may change: they decide where the run runs and what it reports,
# not what it computes. Every other option is refused on --resume when it differs.
RUN_NEUTRAL_OPTIONS = ("checkpoint_every", "log_every", "device", "wandb_project")
_FLAGS = {
    "steps": "--steps",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "seed": "--seed",
    "k": "--k",
    "n_latents": "--n-latents",
}
# Bytes per parameter while training: the float32 weight, its gradient and Adam's two moments.
TRAINING_BYTES_PER_PARAMETER = 16


def lr_at(step: int, cfg: TrainConfig, base_lr: float) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last `lr_decay_fraction`."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps > 0 else 1.0
    decay_steps = int(cfg.steps * cfg.lr_decay_fraction)
    decay_start = cfg.steps - decay_steps
    decay = 1.0 if step < decay_start or decay_steps == 0 else (cfg.steps - step) / decay_steps
    return base_lr * warm * decay


def local_device(device: str | torch.device) -> torch.device:
    """The device of this process: under torchrun each rank takes its own GPU (LOCAL_RANK), since
    NCCL refuses two ranks on one device; an explicit index (cuda:1) is kept."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


class _Distributed:
    """torchrun environment: rank, world size; a no-op for a single process, or when this process
    trains a model of its own (`data_parallel=False`: several SAEs spread over the ranks)."""

    def __init__(self, device: torch.device, data_parallel: bool = True):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1")) if data_parallel else 1
        self.rank = int(os.environ.get("RANK", "0")) if data_parallel else 0
        self.active = self.world_size > 1
        device = local_device(device)
        if device.type == "cuda":
            if device.index is None:  # set_device needs an index: the process's current GPU
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
        self.device = device
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _leftovers_only(out: Path) -> bool:
    """Whether `out` holds nothing but what a run stopped before its first checkpoint leaves: its
    metrics.jsonl and temporary files of interrupted writes (or nothing at all)."""
    return all(p.name == METRICS_FILE or is_temp_of(p.name, RUN_FILES) for p in out.iterdir())


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse an --out that is a file, or (unless resuming) holds a model or anything else; what
    --resume needs of the folder is checked by the trainer, with the checkpoint."""
    if out.exists() and not out.is_dir():
        raise HsaeError(f"--out {out} is a file; give a folder")
    check_writable(out)
    if resume:
        return
    if (out / CONFIG_FILE).exists() or (out / CHECKPOINT_FILE).exists():
        raise HsaeError(f"--out {out} already holds a model; pass --resume to continue it or choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if _leftovers_only(out):
            raise HsaeError(
                f"--out {out} holds what a run stopped before its first checkpoint left ({METRICS_FILE}); pass "
                "--resume to start that run again, or choose another --out"
            )
        raise HsaeError(f"--out {out} is not empty; choose a new or empty folder (nothing was written)")


def _resume_state(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The checkpoint's tensors and its state record (step, run record), None when there is none;
    a damaged checkpoint is a named error."""
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        return None
    damaged = f"--resume: {path} is damaged"
    fix = "the run cannot continue from it: train again into a new --out"
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = json.loads(metadata["state"])
    except (SafetensorError, ValueError, RuntimeError) as err:  # json's errors are ValueErrors
        raise HsaeError(f"{damaged} ({err}); {fix}") from None
    except KeyError:
        raise HsaeError(f"{damaged} (its metadata has no run state); {fix}") from None
    record = meta.get("record") if isinstance(meta, dict) else None
    step = meta.get("step") if isinstance(meta, dict) else None
    if not (isinstance(step, int) and step >= 0 and isinstance(record, dict)):
        raise HsaeError(f"{damaged} (its run state has no step and run record); {fix}")
    for section in ("sae", "train"):
        if not isinstance(record.get(section), dict):
            raise HsaeError(f"{damaged} (its run record has no '{section}' section); {fix}")
    if not isinstance(record.get("data") or {}, dict):
        raise HsaeError(f"{damaged} (its data record is not an object); {fix}")
    return tensors, meta


def _option_name(field: str) -> str:
    return _FLAGS.get(field, f"-o {field}")


def _resumed_train_config(saved: dict[str, Any], new: TrainConfig, n_latents: int, k: int | None) -> TrainConfig:
    """The training config of a resumed run: the saved one, with only the run-neutral options taken
    from `new`. Any other option that differs is refused, named with both values. A dead window left
    out keeps the run's own (runs saved before the default scaled with the width hold 1000000)."""
    old = from_dict(TrainConfig, saved, what="the checkpoint's training config", complete=True)
    for field in fields(TrainConfig):
        name = field.name
        if name in RUN_NEUTRAL_OPTIONS:
            continue
        was, now = getattr(old, name), getattr(new, name)
        if name == "lr":  # the default rate is a number too: compare the rates used
            was, now = old.resolved_lr(n_latents), new.resolved_lr(n_latents)
        if name == "dead_window_tokens":
            if now is None:
                continue
            was, now = old.resolved_dead_window(n_latents, k), new.resolved_dead_window(n_latents, k)
        if was != now:
            flag = _option_name(name)
            why = (
                "the learning-rate schedule depends on the number of steps"
                if name in ("steps", "lr_warmup_steps", "lr_decay_fraction")
                else "it decides the run's batches and updates"
            )
            raise HsaeError(
                f"--resume: {flag} is {now!r} now but {was!r} in the run being resumed ({why}); resume with {flag} "
                f"{was}, or train into a new --out"
            )
    return replace(old, **{name: getattr(new, name) for name in RUN_NEUTRAL_OPTIONS})


def _check_resume_compatible(saved: dict[str, Any], sae_cfg: SAEConfig, source: ActivationSource) -> None:
    saved_sae = dict(saved["sae"])
    if saved_sae.get("d_in") != source.d_in:
        raise HsaeError(
            f"the data has width {source.d_in} but the checkpoint being resumed was trained on width "
            f"{saved_sae.get('d_in')}; resume with the same --data"
        )
    # The source's description names everything that decides its batches (files, settings such as a
    # store's norm limit, seeds): any difference would change where the resumed run continues.
    saved_data, data = saved.get("data") or {}, json.loads(json.dumps(source.describe()))
    for key in sorted(set(saved_data) | set(data)):
        if saved_data.get(key) != data.get(key):
            raise HsaeError(
                f"--resume: the run being resumed read its data with {key} {saved_data.get(key)!r}, this one with "
                f"{key} {data.get(key)!r}; resume with the same --data and data options (or train into a new --out)"
            )
    new = to_dict(sae_cfg)
    for key, value in new.items():
        if key == "input_scale":
            continue
        if saved_sae.get(key) != value:
            flag = _option_name(key)
            raise HsaeError(
                f"--resume: {flag} is {value!r} now but {saved_sae.get(key)!r} in the run being resumed; resume with "
                f"{flag} {saved_sae.get(key)}, or train into a new --out"
            )


def _missing_folders(out: Path) -> list[Path]:
    """`out` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for folder in (out, *out.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _trimmed_metrics(text: str, step: int) -> str:
    """The metric lines up to `step`: later ones (logged after the checkpoint being resumed) and a
    line torn by a killed process are dropped."""
    keep = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line + "\n")
    return "".join(keep)


class _TrainingForward(torch.nn.Module):
    """The family's training step as a module's forward, so that DistributedDataParallel (which
    synchronises gradients of what its wrapped module's forward computed) can wrap it."""

    def __init__(self, model: SAE):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, ctx: StepContext) -> SAEOutput:
        return self.model.training_forward(x, ctx)


class Trainer:
    def __init__(
        self,
        sae_config: SAEConfig,
        train_config: TrainConfig,
        source: ActivationSource,
        out: str | Path,
        *,
        resume: bool = False,
        show_progress: bool = True,
        stop_after: int | None = None,
        data_parallel: bool = True,
    ):
        self.cfg = train_config
        self.source = source
        self.out = Path(out)
        self.resume = resume
        self.show_progress = show_progress
        # Stop (as if killed, after the checkpoint at that step) — used to test resuming.
        self.stop_after = stop_after
        if sae_config.d_in != source.d_in:
            raise HsaeError(f"the SAE's d_in {sae_config.d_in} differs from the data's width {source.d_in}")
        self.device = torch.device(train_config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise HsaeError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        self.family = get_family(sae_config.arch)
        # Before anything is allocated: a model that cannot fit is refused with the memory it needs.
        check_memory(
            parameter_count(self.family, sae_config) * TRAINING_BYTES_PER_PARAMETER,
            self.device,
            f"training an SAE of {sae_config.n_latents} latents on width {sae_config.d_in} (float32 weights, "
            "gradients and Adam's two moments)",
            "lower --n-latents (or --expansion-factor)",
        )
        self.dist = _Distributed(self.device, data_parallel)
        self.device = self.dist.device
        self.sae_config = sae_config
        # The step of the newest checkpoint in the folder (None: none yet).
        self._checkpoint_step: int | None = None

    # ----- set-up ---------------------------------------------------------------------------
    def _record(self, model: SAE) -> dict[str, Any]:
        return {
            "hsae_version": __version__,
            "sae": to_dict(model.config),
            "train": to_dict(self.cfg),
            "data": self.source.describe(),
        }

    def _fresh_model(self) -> SAE:
        torch.manual_seed(self.cfg.seed)
        sample = self.source.sample(INIT_SAMPLE_ROWS).float()
        scale = standard_input_scale(sample) if self.cfg.normalize_inputs else 1.0
        config = replace(self.sae_config, input_scale=scale)
        model = self.family.from_config(config)
        xn = sample * scale
        with torch.no_grad():
            if self.cfg.b_dec_init == "geometric_median":
                model.b_dec.copy_(init_b_dec_geometric_median(xn[:4096]))
            elif self.cfg.b_dec_init == "mean":
                model.b_dec.copy_(xn.mean(0))
        return model

    def _optimizer(self, model: SAE) -> torch.optim.Adam:
        # The fused kernel is several times faster than the default per-tensor loop (measured about
        # 27 ms against 120 ms per step at 6144 x 384 on 2 CPU cores) and equal up to rounding.
        fused = self.device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in model.parameters())
        return torch.optim.Adam(
            model.parameters(),
            lr=self.cfg.resolved_lr(model.n_latents),
            betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
            fused=fused,
        )

    def _open_folder(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Check the output folder and clear what killed runs left in it; the checkpoint to resume
        from, or None for a fresh start."""
        check_out_dir(self.out, resume=True)  # a file is refused; the caller checked a fresh folder
        if self.dist.is_main:
            remove_stale_temps(self.out, RUN_FILES)
        if not self.resume:
            if (self.out / CONFIG_FILE).exists() or (self.out / CHECKPOINT_FILE).exists():
                raise HsaeError(f"{self.out} already holds a model; resume it or choose another folder")
            return None
        state = _resume_state(self.out)
        if state is None:
            if (self.out / CONFIG_FILE).exists():
                raise HsaeError(f"--resume: {self.out} holds a model but no {CHECKPOINT_FILE}; it cannot be continued")
            if self.out.is_dir() and not _leftovers_only(self.out):
                shown = ", ".join(sorted(p.name for p in self.out.iterdir())[:5])
                raise HsaeError(
                    f"--resume: {self.out} holds no run to resume (no {CHECKPOINT_FILE}; it holds {shown}); give "
                    "the folder of the run to continue, or train into a new or empty --out"
                )
        return state

    # ----- checkpoints ------------------------------------------------------------------------
    def _save(self, model: SAE, opt: torch.optim.Adam, step: int, since_fired: torch.Tensor) -> None:
        if not self.dist.is_main:
            return
        tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
        names = {id(p): n for n, p in model.named_parameters()}
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p, {})
                for key, value in state.items():
                    tensors[f"optim.{names[id(p)]}.{key}"] = (
                        torch.as_tensor(value).reshape(-1) if key == "step" else value
                    )
        tensors.update({f"family.{k}": v for k, v in model.training_state().items()})
        tensors["trainer.since_fired"] = since_fired
        tensors["trainer.rng"] = torch.get_rng_state()
        if torch.cuda.is_available() and self.device.type == "cuda":
            tensors["trainer.cuda_rng"] = torch.cuda.get_rng_state(self.device)
        state = {"step": step, "world_size": self.dist.world_size, "record": self._record(model)}
        # Order matters for crash safety: the checkpoint first (resume reads it), then the model.
        write_safetensors(self.out / CHECKPOINT_FILE, tensors, metadata={"state": json.dumps(state)})
        self._checkpoint_step = step
        self._save_model(model, step)

    def _save_model(self, model: SAE, step: int) -> None:
        # config.json records the step of the checkpoint its weights are from ("step").
        model.save(self.out, record={**self._record(model), "step": step})

    def _model_files_behind(self, step: int) -> bool:
        """Whether the model files are older than the checkpoint at `step` (a run killed between
        writing its last checkpoint and its model files)."""
        if not (self.out / CONFIG_FILE).is_file() or not (self.out / WEIGHTS_FILE).is_file():
            return True
        try:
            saved = read_config(self.out).get("step")
        except HsaeError:  # a damaged config.json: the checkpoint has what it should say
            return True
        return saved is not None and saved != step

    def _restore(self, model: SAE, opt: torch.optim.Adam, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        path = self.out / CHECKPOINT_FILE
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            check_state(weights, model.state_dict(), path, f"the {model.arch} model of the run being resumed")
        except HsaeError as err:
            raise HsaeError(f"--resume: the checkpoint is damaged: {err}; train again into a new --out") from None
        if "trainer.rng" not in tensors or "trainer.since_fired" not in tensors:
            raise HsaeError(f"--resume: {path} is damaged (it lacks the trainer's state); train again into a new --out")
        try:
            model.load_state_dict(weights)
            model.load_training_state({k[7:]: v for k, v in tensors.items() if k.startswith("family.")})
            params = dict(model.named_parameters())
            # Fused Adam keeps its step counter on the parameters' device; the default one on the CPU.
            step_device = self.device if opt.param_groups[0].get("fused") else torch.device("cpu")
            for name, p in params.items():
                st = {}
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    t = tensors.get(f"optim.{name}.{key}")
                    if t is not None:
                        if key != "step" and t.shape != p.shape:
                            raise ValueError(f"optim.{name}.{key} has shape {tuple(t.shape)}, not {tuple(p.shape)}")
                        st[key] = t.reshape(()).to(step_device) if key == "step" else t.to(self.device)
                if st:
                    opt.state[p] = st
            torch.set_rng_state(tensors["trainer.rng"])
            if "trainer.cuda_rng" in tensors and self.device.type == "cuda":
                torch.cuda.set_rng_state(tensors["trainer.cuda_rng"], self.device)
            since_fired = tensors["trainer.since_fired"].to(self.device)
        except (RuntimeError, ValueError, TypeError) as err:
            raise HsaeError(f"--resume: {path} is damaged ({err}); train again into a new --out") from None
        if since_fired.shape != (model.n_latents,):
            raise HsaeError(f"--resume: {path} is damaged (its dead-latent counters do not fit the model)")
        return since_fired

    def _resumed_model(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[SAE, Any, Any, int]:
        """The model, optimiser and dead-latent counters restored from a checkpoint, and its step;
        the run's options must match those it was started with (the training config becomes the
        saved one, with the run-neutral options of this call)."""
        record = meta["record"]
        _check_resume_compatible(record, self.sae_config, self.source)
        saved_world = meta.get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise HsaeError(
                f"--resume: the run being resumed ran on {saved_world} data-parallel process(es), this one on "
                f"{self.dist.world_size} (each reads its own share of the data); resume with --nproc_per_node "
                f"{saved_world}, or train into a new --out"
            )
        self.cfg = _resumed_train_config(record["train"], self.cfg, self.sae_config.n_latents, self.sae_config.k)
        saved = from_dict(self.family.config_class, record["sae"], what="the checkpoint's sae config", complete=True)
        model = self.family.from_config(saved).to(self.device)
        opt = self._optimizer(model)
        since_fired = self._restore(model, opt, tensors)
        return model, opt, since_fired, int(meta["step"])

    # ----- the loop ----------------------------------------------------------------------------
    def run(self) -> SAE:
        state = self._open_folder()
        new_folders = _missing_folders(self.out)
        if state is not None:
            model, opt, since_fired, start = self._resumed_model(*state)
            self._checkpoint_step = start
        else:
            model = self._fresh_model().to(self.device)
            opt = self._optimizer(model)
            since_fired = torch.zeros(model.n_latents, dtype=torch.long, device=self.device)
            start = 0
        cfg = self.cfg
        model.train()
        if start >= cfg.steps:  # a finished run: its model files are brought up to its last checkpoint
            if self.dist.is_main and self._model_files_behind(start):
                self._save_model(model, start)
            return model.eval()
        if state is not None and self.dist.is_main:
            self._trim_metrics(start)
        log = _MetricsLog(self.out / METRICS_FILE, fresh=state is None) if self.dist.is_main else None
        try:
            self._loop(model, opt, since_fired, start, log)
        except BaseException:
            # A run stopped before its first checkpoint leaves the folder as it found it: nothing
            # could be resumed from what it wrote.
            if log is not None and self._checkpoint_step is None:
                log.discard()
                for folder in new_folders:
                    if folder.is_dir() and not any(folder.iterdir()):
                        folder.rmdir()
            raise
        finally:
            if log is not None:
                log.close()
        return model.eval()

    def _loop(self, model: SAE, opt: torch.optim.Adam, since_fired: torch.Tensor, start: int, log: _MetricsLog | None):
        cfg = self.cfg
        wrapped: torch.nn.Module = _TrainingForward(model)
        if self.dist.active:
            wrapped = torch.nn.parallel.DistributedDataParallel(
                wrapped, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        base_lr = cfg.resolved_lr(model.n_latents)
        dead_window = cfg.resolved_dead_window(model.n_latents, model.config.k)
        tokens_per_step = cfg.batch_size * self.dist.world_size
        # Minimal user sources may not count their rows: no epoch figure then.
        epoch_rows = getattr(self.source, "epoch_rows", lambda: None)()
        if epoch_rows and self.dist.is_main and cfg.steps * tokens_per_step > epoch_rows:
            warnings.warn(
                HsaeWarning(
                    f"training reads the data {cfg.steps * tokens_per_step / epoch_rows:.2f} times ({epoch_rows} rows, "
                    f"{cfg.steps} steps of {tokens_per_step} tokens); harvest more tokens or train fewer steps to "
                    "see every row once"
                ),
                stacklevel=3,
            )
        wandb_run = self._wandb(model) if self.dist.is_main else None
        batches = self.source.batches(cfg.batch_size, start, self.dist.rank, self.dist.world_size)
        progress = self._progress(start) if (self.dist.is_main and self.show_progress) else None
        t0, tokens = time.perf_counter(), 0
        try:
            for step in range(start, cfg.steps):
                x = next(batches).to(self.device, non_blocking=True)
                dead = since_fired >= dead_window
                ctx = StepContext(step=step, total_steps=cfg.steps, dead_mask=dead)
                # Free last step's gradients before the forward, not after: a smaller peak.
                opt.zero_grad(set_to_none=True)
                out = wrapped(x, ctx)
                loss = out.loss
                done = step + 1
                log_now = done % cfg.log_every == 0 or done == cfg.steps
                save_now = done % cfg.checkpoint_every == 0 or done == cfg.steps
                # Reading the loss waits for the GPU: on CUDA it is checked when the step logs or
                # saves (a non-finite loss stays so once the weights are, and is caught before any
                # checkpoint is written), on the CPU every step.
                if (self.device.type == "cpu" or log_now or save_now) and not torch.isfinite(loss):
                    raise HsaeError(self._diverged(float(loss.detach()), done))
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, cfg, base_lr)
                # The reconstruction is not held through the backward (one (n, d_in) tensor less at
                # the step's peak): what the log needs of it is measured first.
                step_fvu = fvu(x, out.x_hat.detach()) if log_now else None
                out.x_hat = None
                loss.backward()
                model.remove_parallel_decoder_grad()
                if cfg.grad_clip_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
                opt.step()
                model.normalize_decoder()
                model.after_step(out, ctx)

                fired = self.dist.all_sum(fire_counts(out.codes).to(self.device)) > 0
                since_fired += x.shape[0] * self.dist.world_size
                since_fired[fired] = 0
                tokens += x.shape[0] * self.dist.world_size
                if log_now:
                    row = self._metrics(done, step_fvu, out, dead, opt, tokens / (time.perf_counter() - t0))
                    if epoch_rows:
                        row["epochs"] = done * tokens_per_step / epoch_rows
                    if log is not None:
                        log.write(row)
                    if progress is not None:
                        progress.update(row)
                    if wandb_run is not None:
                        wandb_run.log(row, step=done)
                elif progress is not None:
                    progress.advance()
                if save_now:
                    self._save(model, opt, done, since_fired)
                    self.dist.barrier()
                if self.stop_after is not None and done >= self.stop_after:
                    break
        finally:
            if progress is not None:
                progress.close()
            if wandb_run is not None:
                wandb_run.finish()

    def _diverged(self, loss: float, step: int) -> str:
        """The message for a non-finite loss, true to what the folder holds."""
        if self._checkpoint_step is None:
            kept = f"nothing was saved, {self.out} is as it was"
            again = "train again"
        else:
            kept = f"the checkpoint at step {self._checkpoint_step} in {self.out} is intact"
            again = "train again into a new --out"
        return f"the loss became {loss} by step {step}; {again} with a lower --lr, or check the data ({kept})"

    def _trim_metrics(self, step: int) -> None:
        """Drop metric lines past the resumed step, so the file reads as one uninterrupted run."""
        path = self.out / METRICS_FILE
        if path.exists():
            text = path.read_text(errors="replace")
            kept = _trimmed_metrics(text, step)
            if kept != text:  # (a file that needs no trimming is left alone: a `tail -f` keeps following it)
                write_text(path, kept)

    def _metrics(self, step, step_fvu, out, dead, opt, tokens_per_s) -> dict[str, Any]:
        with torch.no_grad():
            row = {
                "step": step,
                "loss": float(out.loss),
                **{f"loss/{k}": float(v) for k, v in out.losses.items()},
                "fvu": step_fvu,
                "l0": float(l0_per_row(out.codes).mean()),
                "dead_fraction": float(dead.float().mean()),
                "lr": opt.param_groups[0]["lr"],
                "tokens_per_s": tokens_per_s,
            }
        return row

    def _wandb(self, model: SAE):
        if not self.cfg.wandb_project:
            return None
        try:
            import wandb
        except ImportError:
            raise HsaeError("--wandb-project needs the wandb package: pip install 'hsae[wandb]'") from None
        return wandb.init(project=self.cfg.wandb_project, config=self._record(model), dir=str(self.out))

    def _progress(self, start: int) -> _ProgressBar:
        return _ProgressBar(self.cfg.steps, start)


class _MetricsLog:
    """metrics.jsonl, opened at its first line: a fresh run starts it anew (a run stopped before its
    first checkpoint left lines nobody can resume), a resumed one appends to the trimmed file."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.fresh = fresh
        self._fh: IO[str] | None = None

    def write(self, row: dict[str, Any]) -> None:
        try:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "w" if self.fresh else "a")
            self._fh.write(json.dumps(row) + "\n")
            self._fh.flush()
        except OSError as err:
            raise os_error(err, self.path) from err

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def discard(self) -> None:
        """Remove what this run wrote (only a fresh run's file: a resumed run's is the run's own)."""
        opened = self._fh is not None
        self.close()
        if opened and self.fresh and self.path.exists():
            self.path.unlink()


class _ProgressBar:
    """A rich progress bar showing loss, FVU, L0 and dead % as they are logged."""

    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=start, stats="")

    def advance(self) -> None:
        self._progress.advance(self._task)

    def update(self, row: dict[str, Any]) -> None:
        stats = (
            f"loss {row['loss']:.4g}  fvu {row['fvu']:.4f}  L0 {row['l0']:.1f}  "
            f"dead {100 * row['dead_fraction']:.1f}%  {row['tokens_per_s']:.0f} tok/s"
        )
        self._progress.update(self._task, completed=row["step"], stats=stats)

    def close(self) -> None:
        self._progress.stop()


def train(
    sae_config: SAEConfig,
    train_config: TrainConfig,
    source: ActivationSource,
    out: str | Path,
    *,
    resume: bool = False,
    show_progress: bool = True,
) -> SAE:
    """Train an SAE and save it in `out` (see the module docstring)."""
    if not resume:
        check_out_dir(Path(out), resume)
    return Trainer(sae_config, train_config, source, out, resume=resume, show_progress=show_progress).run()


__all__ = ["train", "Trainer", "lr_at"]
