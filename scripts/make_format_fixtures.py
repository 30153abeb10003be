"""Make tests/data/formats: tiny SAEs saved by the real libraries, with their codes and reconstructions
of fixed inputs, and hsae's exports with the real libraries' codes and reconstructions of them.

Not run in CI (the libraries are not hsae dependencies). Each step runs in the environment that has
its library; sae-lens, sparsify and dictionary_learning each live in a virtual environment of their
own, never in hsae's:

    python3 scripts/make_format_fixtures.py hsae                  # hsae models + their exports (hsae's env)
    python3 scripts/make_format_fixtures.py gemma_scope           # numpy only
    /tmp/saelens-venv/bin/python scripts/make_format_fixtures.py saelens               # sae-lens==6.54.*
    /tmp/sparsify-venv/bin/python scripts/make_format_fixtures.py sparsify             # eai-sparsify==1.3.3
    /tmp/dl-venv/bin/python scripts/make_format_fixtures.py dictionary_learning        # dictionary-learning==0.1.0

(each venv: `python3 -m venv V && V/bin/pip install torch==2.13.0 PACKAGE -c <(echo torch==2.13.0)`,
then `V/bin/pip uninstall -y torchvision` where one came along). Run the hsae step first: the library
steps also load hsae's exports (tests/data/formats/exports/ARCH-FORMAT) with the library's own loader
and record what it computes from them (library.safetensors). Every reference file holds the inputs
`x` (n, d_in), the dense `codes` (n, d_sae) and the reconstruction `x_hat` (n, d_in), in float32.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1] / "tests" / "data" / "formats"
D_IN, D_SAE, N = 8, 16, 12
REFERENCE = "reference.safetensors"  # what the library that saved a fixture computes from it
LIBRARY = "library.safetensors"  # what a library computes from hsae's export of a model
HSAE_REFERENCE = "hsae.safetensors"  # what hsae computes with the model it exported


def inputs() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, D_IN, generator=gen) * 1.5 + 0.5


def save_reference(path: Path, x: torch.Tensor, codes: torch.Tensor, x_hat: torch.Tensor) -> None:
    tensors = {"x": x, "codes": codes, "x_hat": x_hat}
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(path))


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Random non-zero biases and weights off their initial values, so every term matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dtype.is_floating_point and "threshold" not in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def export_dirs(fmt: str) -> list[Path]:
    return sorted(p for p in (ROOT / "exports").glob(f"*-{fmt}") if p.is_dir())


def export_inputs(export: Path) -> torch.Tensor:
    arch = export.name.rsplit("-", 1)[0]
    return load_file(str(ROOT / "hsae" / arch / HSAE_REFERENCE))["x"]


# ----- hsae: small models of every flat family, and their exports ---------------------------------
def make_hsae() -> None:
    from hsae.config import from_dict
    from hsae.formats import FORMATS, export_model
    from hsae.models import get_family
    from hsae.models.codes import to_dense

    x = inputs()
    options = {
        "relu": {},
        "topk": {"k": 3},
        "jumprelu": {},
        "batchtopk": {"k": 3},
        "matryoshka": {"k": 3, "group_fractions": [0.25, 0.25, 0.5]},
    }
    for seed, (arch, extra) in enumerate(options.items()):
        family = get_family(arch)
        config = from_dict(
            family.config_class, {"arch": arch, "d_in": D_IN, "n_latents": D_SAE, "input_scale": 1.7, **extra}
        )
        torch.manual_seed(seed)
        model = family.from_config(config)
        perturb(model, seed)
        with torch.no_grad():
            if family.unit_norm_decoder:
                model.W_dec /= model.W_dec.norm(dim=1, keepdim=True)
            if arch == "jumprelu":
                model.log_threshold.copy_(torch.linspace(-3, 0, D_SAE))
            if arch in ("batchtopk", "matryoshka"):
                model.threshold.fill_(0.45)
        if arch == "topk":  # a saved forest, which no foreign format holds: it travels in hsae.json
            model.set_hierarchy(torch.tensor([-1] * 4 + [0, 0, 1, 1, 2, 2, 3, 3] + [-1] * 4))
        folder = ROOT / "hsae" / arch
        model.eval().save(folder, record={"data": {"kind": "synthetic", "d_in": D_IN}})
        with torch.no_grad():
            codes = model.encode(x)
            save_reference(folder / HSAE_REFERENCE, x, to_dense(codes), model.decode(codes))
        for fmt, module in FORMATS.items():
            if arch in module.WRITES:
                export_model(folder, fmt, ROOT / "exports" / f"{arch}-{fmt}", overwrite=True)
    print(f"hsae models and exports in {ROOT}")


# ----- Gemma Scope: params.npz as released, and the documented JumpReLU forward in numpy ----------
def gemma_forward(params: dict, x):
    pre = x @ params["W_enc"] + params["b_enc"]
    codes = (pre > params["threshold"]) * (pre * (pre > 0))
    return codes, codes @ params["W_dec"] + params["b_dec"]


def make_gemma_scope() -> None:
    import numpy as np

    rng = np.random.default_rng(7)
    W_dec = rng.normal(size=(D_SAE, D_IN)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    params = {
        "W_enc": (W_dec.T + 0.3 * rng.normal(size=(D_IN, D_SAE))).astype(np.float32),
        "W_dec": W_dec,
        "b_enc": (0.3 * rng.normal(size=D_SAE)).astype(np.float32),
        "b_dec": (0.5 * rng.normal(size=D_IN)).astype(np.float32),
        "threshold": rng.uniform(0.05, 1.0, size=D_SAE).astype(np.float32),
    }
    folder = ROOT / "gemma_scope" / "layer_0" / "width_16" / "average_l0_3"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **params)
    x = inputs()
    codes, x_hat = gemma_forward(params, x.numpy())
    save_reference(folder / REFERENCE, x, torch.from_numpy(codes), torch.from_numpy(x_hat))
    for export in export_dirs("gemma_scope"):
        with np.load(export / "params.npz", allow_pickle=False) as data:
            exported = {k: data[k] for k in data.files}
        xe = export_inputs(export)
        codes, x_hat = gemma_forward(exported, xe.numpy())
        save_reference(export / LIBRARY, xe, torch.from_numpy(codes), torch.from_numpy(x_hat))
    print("gemma_scope fixtures written")


# ----- SAELens ------------------------------------------------------------------------------------
def make_saelens() -> None:
    import sae_lens
    from sae_lens import SAE
    from sae_lens.saes.sae import SAEMetadata, TrainStepInput

    x = inputs()
    out = ROOT / "saelens"

    def meta() -> SAEMetadata:
        return SAEMetadata(model_name="gpt2", hook_name="blocks.0.hook_resid_pre")

    def record(folder: Path, loaded=None) -> None:
        sae = loaded or SAE.load_from_disk(folder)
        with torch.no_grad():
            codes = sae.encode(x)
            save_reference(folder / REFERENCE, x, codes, sae.decode(codes))

    def inference(name: str, cfg, seed: int) -> None:
        cls = SAE.get_sae_class_for_architecture(cfg.architecture())
        torch.manual_seed(seed)
        sae = cls(cfg)
        perturb(sae, seed)
        if hasattr(sae, "threshold"):
            with torch.no_grad():
                sae.threshold.copy_(torch.linspace(0.0, 0.9, D_SAE))
        sae.save_model(out / name)
        record(out / name)

    def train(cfg, seed: int, steps: int = 30):
        """A few genuine sae-lens training steps on random data (thresholds learned as it learns them)."""
        cls = sae_lens.saes.sae.TrainingSAE.get_sae_class_for_architecture(cfg.architecture())
        torch.manual_seed(seed)
        sae = cls(cfg)
        perturb(sae, seed, 0.1)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        data = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.5
        for step in range(steps):
            step_input = TrainStepInput(
                sae_in=data, coefficients={}, dead_neuron_mask=None, n_training_steps=step, is_logging_step=False
            )
            loss = sae.training_forward_pass(step_input).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return sae

    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAEConfig

    inference("standard", StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta()), 1)
    inference(
        "standard_no_b_dec_input",
        StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False, metadata=meta()),
        2,
    )
    inference("topk", TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3, metadata=meta()), 3)
    inference(
        "topk_rescaled",
        TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3, rescale_acts_by_decoder_norm=True, metadata=meta()),
        4,
    )
    inference("jumprelu", JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta()), 5)
    # Refused on import: gated (no hsae family) and per-token layer norm (no fixed weights reproduce it).
    inference("gated", GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta()), 6)
    inference(
        "layer_norm",
        StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="layer_norm", metadata=meta()),
        7,
    )

    # BatchTopK and Matryoshka: trained by sae-lens, saved both as it saves them for inference
    # (JumpReLU with the learned threshold) and in training form (the topk_threshold buffer). The
    # reference of both is what the inference SAE computes.
    trained = {
        "batchtopk": train(
            BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3, topk_threshold_lr=0.2, metadata=meta()), 8
        ),
        "matryoshka_batchtopk": train(
            MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=D_IN, d_sae=D_SAE, k=3, topk_threshold_lr=0.2, matryoshka_widths=[4, 8, D_SAE], metadata=meta()
            ),
            9,
        ),
    }
    for name, sae in trained.items():
        sae.save_inference_model(out / name)
        record(out / name)
        sae.save_model(out / f"{name}_training_form")
        save_file(load_file(str(out / name / REFERENCE)), str(out / f"{name}_training_form" / REFERENCE))

    # A pre-6.0 config (sae-lens 3.x/4.x field names) over a TopK SAE's weights, read by sae-lens's
    # own defaulting rules.
    legacy = out / "legacy_topk"
    legacy.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(10)
    sae = SAE.get_sae_class_for_architecture("topk")(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3))
    perturb(sae, 10)
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(legacy / "sae_weights.safetensors"))
    legacy_cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "gpt2",
        "hook_point": "blocks.0.hook_resid_pre",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "finetuning_scaling_factor": False,
        "sae_lens_version": "4.4.1",
    }
    (legacy / "cfg.json").write_text(json.dumps(legacy_cfg))
    record(legacy)

    for export in export_dirs("saelens"):
        sae = SAE.load_from_disk(export)
        xe = export_inputs(export)
        with torch.no_grad():
            codes = sae.encode(xe)
            save_reference(export / LIBRARY, xe, codes, sae.decode(codes))
    print(f"saelens fixtures written with sae-lens {sae_lens.__version__}")


# ----- sparsify -----------------------------------------------------------------------------------
def make_sparsify() -> None:
    from importlib.metadata import version

    from sparsify import SparseCoder, SparseCoderConfig

    x = inputs()
    out = ROOT / "sparsify"

    def record(folder: Path, sae) -> None:
        with torch.no_grad():
            enc = sae.encode(xs := x)
            codes = torch.zeros(xs.shape[0], sae.num_latents).scatter(1, enc.top_indices, enc.top_acts)
            save_reference(folder / REFERENCE, xs, codes, sae.decode(enc.top_acts, enc.top_indices))

    # A TopK SAE trained a few steps by sparsify's own forward (FVU + AuxK), saved as its trainer does.
    torch.manual_seed(11)
    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=3))
    perturb(sae, 11, 0.1)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    data = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(11)) * 1.5 + 0.5
    for _ in range(30):
        fwd = sae(data, dead_mask=torch.zeros(D_SAE, dtype=torch.bool))
        opt.zero_grad()
        fwd.fvu.backward()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    sae.save_to_disk(out / "layers.0")
    record(out / "layers.0", SparseCoder.load_from_disk(out / "layers.0"))
    # Refused on import: the groupmax activation.
    groupmax = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=4, activation="groupmax"))
    groupmax.save_to_disk(out / "groupmax")

    for export in export_dirs("sparsify"):
        sae = SparseCoder.load_from_disk(export)
        xe = export_inputs(export)
        with torch.no_grad():
            enc = sae.encode(xe)
            codes = torch.zeros(xe.shape[0], sae.num_latents).scatter(1, enc.top_indices, enc.top_acts)
            save_reference(export / LIBRARY, xe, codes, sae.decode(enc.top_acts, enc.top_indices))
    print(f"sparsify fixtures written with eai-sparsify {version('eai-sparsify')}")


# ----- dictionary_learning ------------------------------------------------------------------------
def make_dictionary_learning() -> None:
    from importlib.metadata import version

    from dictionary_learning.dictionary import AutoEncoder, AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import (
        MatryoshkaBatchTopKSAE,
        MatryoshkaBatchTopKTrainer,
    )
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer

    x = inputs()
    out = ROOT / "dictionary_learning"
    data = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(12)) * 1.5 + 0.5
    loaders = {
        "AutoEncoder": lambda p: AutoEncoder.from_pretrained(p, normalize_decoder=False),
        "AutoEncoderNew": AutoEncoderNew.from_pretrained,
        "AutoEncoderTopK": AutoEncoderTopK.from_pretrained,
        "BatchTopKSAE": BatchTopKSAE.from_pretrained,
        "MatryoshkaBatchTopKSAE": MatryoshkaBatchTopKSAE.from_pretrained,
        "JumpReluAutoEncoder": JumpReluAutoEncoder.from_pretrained,
    }

    def save(folder: Path, ae, config: dict | None) -> None:
        """As trainSAE saves: ae.pt (the state dict, on the CPU) and the trainer's config.json."""
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, folder / "ae.pt")
        if config is not None:
            (folder / "config.json").write_text(json.dumps({"trainer": config}, indent=4, default=str))

    def record(folder: Path, cls: str) -> None:
        ae = loaders[cls](folder / "ae.pt")
        with torch.no_grad():
            codes = ae.encode(x)
            save_reference(folder / REFERENCE, x, codes, ae.decode(codes))

    def trained(trainer_cls, seed: int, **kwargs):
        torch.manual_seed(seed)
        trainer = trainer_cls(
            steps=40,
            activation_dim=D_IN,
            dict_size=D_SAE,
            k=3,
            layer=0,
            lm_name="EleutherAI/pythia-70m-deduped",
            lr=1e-2,
            warmup_steps=1,
            threshold_start_step=0,
            threshold_beta=0.5,
            device="cpu",
            submodule_name="gpt_neox.layers.0",
            **kwargs,
        )
        for step in range(40):
            trainer.update(step, data)
        return trainer

    for name, trainer in {
        "topk": trained(TopKTrainer, 13),
        "batchtopk": trained(BatchTopKTrainer, 14),
        "matryoshka": trained(MatryoshkaBatchTopKTrainer, 15, group_fractions=[0.25, 0.25, 0.5]),
    }.items():
        config = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in trainer.config.items()}
        save(out / name, trainer.ae, config)
        record(out / name, config["dict_class"])
    # The same BatchTopK weights without the config.json that tells the class: refused.
    torch.save(torch.load(out / "batchtopk" / "ae.pt", weights_only=True), out / "ambiguous.pt")

    for name, cls, ae in (
        ("standard", "AutoEncoder", AutoEncoder(D_IN, D_SAE)),
        ("standard_new", "AutoEncoderNew", AutoEncoderNew(D_IN, D_SAE)),
        ("jumprelu", "JumpReluAutoEncoder", JumpReluAutoEncoder(D_IN, D_SAE)),
    ):
        perturb(ae, len(name))
        if cls == "JumpReluAutoEncoder":
            with torch.no_grad():
                ae.threshold.copy_(torch.linspace(0.0, 0.9, D_SAE))
        save(out / name, ae, {"dict_class": cls, "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 0})
        record(out / name, cls)
    gated = GatedAutoEncoder(D_IN, D_SAE)
    save(out / "gated", gated, {"dict_class": "GatedAutoEncoder"})

    classes = {"relu": "AutoEncoder", "topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE"}
    classes.update(matryoshka="MatryoshkaBatchTopKSAE", jumprelu="JumpReluAutoEncoder")
    for export in export_dirs("dictionary_learning"):
        ae = loaders[classes[export.name.rsplit("-", 1)[0]]](export / "ae.pt")
        xe = export_inputs(export)
        with torch.no_grad():
            codes = ae.encode(xe)
            save_reference(export / LIBRARY, xe, codes, ae.decode(codes))
    print(f"dictionary_learning fixtures written with dictionary-learning {version('dictionary-learning')}")


STEPS = {
    "hsae": make_hsae,
    "gemma_scope": make_gemma_scope,
    "saelens": make_saelens,
    "sparsify": make_sparsify,
    "dictionary_learning": make_dictionary_learning,
}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in STEPS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(STEPS)}}}")
    STEPS[sys.argv[1]]()
