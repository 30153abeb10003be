"""Property-based tests (hypothesis): hostile options, manifests and model folders end either in a
working result or in HsaeError (at the command line: exit 2 and one line), never in an exception
from deep inside, and change no file that was there before (hashes before and after).

Each test counts the cases it ran and how many ended in a clean error (printed; `pytest -s` shows
the counts, e.g. for the issue's closing note).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import hsae
import hsae.store as store_module
from hsae.cli import main
from hsae.config import TrainConfig, from_dict, parse_overrides
from hsae.errors import HsaeError
from hsae.models.base import load as load_folder
from hsae.sources.harvest import check_store_folder
from hsae.store import MANIFEST, ActivationStore
from test_reliability import make_store

# HSAE_HOSTILE_SCALE=N runs N times the default number of cases (a thorough run; the default keeps
# the suite fast).
SCALE = int(os.environ.get("HSAE_HOSTILE_SCALE", "1"))
SETTINGS = settings(
    deadline=None,
    database=None,  # nothing written into the repository
    derandomize=True,  # the same cases every run: a failure is reproducible, the counts are stable
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Values of every JSON type (and the strings options arrive as), biased towards edges.
numbers = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, -(10**9)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, float("nan"), float("inf"), -float("inf")]),
)
texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e30", "-5", "0", "1e400", "true", "none", "", " ", "1,2", "0x10"]),
)
# Values close to valid ones, so that cases get past the first check and reach the later ones.
plausible = st.one_of(
    st.integers(-3, 70),
    st.floats(-2, 2),
    st.sampled_from(["0.5", "3", "1e-3", "true", "false", "mean", "zeros", "float32", "bfloat16", "1,3", "cpu"]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts, plausible)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=6
)


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def report(name: str, counts: Counter) -> None:
    cases, errors, accepted = counts["cases"], counts["clean error"], counts["accepted"]
    print(f"\n{name}: {cases} hostile cases, {errors} clean errors, {accepted} accepted")
    assert counts["cases"] == counts["clean error"] + counts["accepted"]


def outcome(counts: Counter, *actions) -> list[Any]:
    """One hostile case: every action either returns (its result) or raises HsaeError (None); the
    case is a clean error when one of them raised, accepted when all returned. Any other exception
    fails the test."""
    counts["cases"] += 1
    results = []
    for action in actions:
        try:
            results.append(action())
        except HsaeError as err:
            assert str(err).strip(), "an HsaeError must say something"
            results.append(None)
    counts["accepted" if all(r is not None for r in results) else "clean error"] += 1
    return results


def one_line_or_success(capsys, args: list[str]) -> int:
    """`hsae ARGS` exits 0, or 2 with exactly one line `error: ...` (not an unexpected exception's)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert code in (0, 2), (code, lines)
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: ") and not lines[0].startswith("error: unexpected"), (
            lines
        )
    return code


# ----- the config parser -----------------------------------------------------------------------------
CONFIG_CLASSES = [TrainConfig, *(family.config_class for family in hsae.families().values())]


def _finite_everywhere(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite_everywhere(v) for v in value)
    return True


@st.composite
def hostile_options(draw) -> tuple[type, dict[str, Any]]:
    cls = draw(st.sampled_from(CONFIG_CLASSES))
    names = [f.name for f in dataclasses.fields(cls)]
    base: dict[str, Any] = {}
    if cls is not TrainConfig:  # a valid model to start from, then hostile edits
        arch = next(name for name, fam in hsae.families().items() if fam.config_class is cls)
        base = {"arch": arch, "d_in": 8, "n_latents": 64, "k": 4}
    values = plausible | plausible | json_values | texts
    edits = draw(st.dictionaries(st.sampled_from(names + ["bogus", ""]), values, min_size=1, max_size=4))
    return cls, {**base, **edits}


_config_counts: Counter = Counter()


@settings(SETTINGS, max_examples=300 * SCALE)
@given(case=hostile_options(), as_text=st.booleans())
def test_hostile_option_values_end_in_a_clean_error_or_a_valid_config(case, as_text):
    cls, values = case
    if as_text:  # as they arrive from `-o KEY=VALUE`
        values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
    (config,) = outcome(_config_counts, lambda: from_dict(cls, values, what="options"))
    if config is not None:
        record = dataclasses.asdict(config)
        assert all(_finite_everywhere(v) for v in record.values()), record
        json.dumps(record, allow_nan=False)  # what config.json will hold is standard JSON


def test_zz_config_counts():
    report("option values (config parser)", _config_counts)


@settings(SETTINGS, max_examples=100 * SCALE)
@given(items=st.lists(st.text(max_size=10) | st.sampled_from(["a=", "=b", "==", "k=v=w", "aux-coef=1"]), max_size=4))
def test_hostile_override_strings_parse_or_are_refused(items):
    try:
        parsed = parse_overrides(items)
    except HsaeError as err:
        assert "KEY=VALUE" in str(err)
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items())


# ----- the manifest reader --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_tree(tmp_path_factory):
    """A store and, beside it, another store and a secret file a hostile manifest may point at."""
    root = tmp_path_factory.mktemp("hostile-store")
    make_store(root / "store", rows=120, d_in=4, shard_rows=40)
    make_store(root / "other", rows=40, d_in=4, shard_rows=40, seed=1)
    (root / "secret.txt").write_text("not a shard")
    return root


PATHS = st.sampled_from(
    ["../other/shard-00000.safetensors", "/etc/passwd", "../secret.txt", "..", ".", "", "shard-00000.safetensors",
     "manifest.json", "missing.safetensors", "sub/../shard-00001.safetensors", "\x00", "a" * 300]
)  # fmt: skip


@st.composite
def hostile_manifests(draw, valid: dict[str, Any]) -> Any:
    """The valid manifest with hostile edits, or a hostile JSON value instead of it."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    manifest = json.loads(json.dumps(valid))
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["top", "shard", "hook", "resume"]))
        value = draw(plausible | json_values | PATHS)
        if target == "top":
            key = draw(st.sampled_from([*manifest.keys(), "extra"]))
            if draw(st.booleans()):
                manifest.pop(key, None)
            else:
                manifest[key] = value
        elif target == "shard" and isinstance(manifest.get("shards"), list) and manifest["shards"]:
            entry = manifest["shards"][draw(st.integers(0, len(manifest["shards"]) - 1))]
            if isinstance(entry, dict):
                entry[draw(st.sampled_from(["file", "rows", "sha256"]))] = draw(PATHS) if draw(st.booleans()) else value
        elif target == "hook" and isinstance(manifest.get("hooks"), list) and manifest["hooks"]:
            entry = manifest["hooks"][0]
            if isinstance(entry, dict):
                entry[draw(st.sampled_from(["name", "d_in", "transformer_lens"]))] = value
        else:
            manifest["status"] = "harvesting"
            manifest["resume"] = value
    return manifest


_manifest_counts: Counter = Counter()
_VALID_MANIFEST: dict[str, Any] = {}


def _read_all(path: Path):
    store = ActivationStore.open(path)
    store.verify()
    batch = next(store.batches(8))
    assert batch.shape == (8, store.d_in) and torch.isfinite(batch).all()
    store.sample(5)
    store.describe()
    return store


@settings(SETTINGS, max_examples=200 * SCALE)
@given(data=st.data())
def test_hostile_manifests_end_in_a_clean_error_and_change_nothing(store_tree, data):
    store = store_tree / "store"
    if not _VALID_MANIFEST:
        _VALID_MANIFEST.update(json.loads((store / MANIFEST).read_text()))
    manifest = data.draw(hostile_manifests(_VALID_MANIFEST))
    raw = data.draw(st.sampled_from(["json", "json", "json", "bytes"]))
    text = json.dumps(manifest) if raw == "json" else data.draw(st.binary(max_size=40)).decode("latin-1")
    (store / MANIFEST).write_text(text)
    before = digest(store_tree)
    hashed: list[Path] = []
    real_sha256 = store_module.sha256_of
    try:
        with pytest.MonkeyPatch.context() as patch:  # every file the reader opens is hashed first
            patch.setattr(store_module, "sha256_of", lambda path: hashed.append(Path(path)) or real_sha256(path))
            results = outcome(_manifest_counts, lambda: _read_all(store), lambda: check_store_folder(store) or "none")
        assert digest(store_tree) == before
        root = store.resolve()
        assert all(p.resolve().is_relative_to(root) for p in hashed), hashed  # nothing outside the store is read
        shards = manifest.get("shards") if isinstance(manifest, dict) else None
        files = [e.get("file") for e in shards if isinstance(e, dict)] if isinstance(shards, list) else []
        outside = [
            f for f in files if isinstance(f, str) and "\0" not in f and not (store / f).resolve().is_relative_to(root)
        ]
        assert not (outside and raw == "json" and results[0] is not None), outside
    finally:
        (store / MANIFEST).write_text(json.dumps(_VALID_MANIFEST))


def test_zz_manifest_counts():
    report("manifests (the store reader and the harvester's)", _manifest_counts)


# ----- model loading ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile-model") / "model"
    args = ["train", "--arch", "topk", "--data", "synthetic", "--synthetic", "d_in=8", "--synthetic", "n_roots=4",
            "--n-latents", "16", "--k", "2", "--steps", "4", "--batch-size", "64", "-q", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out


DTYPES = [torch.int32, torch.int64, torch.bool, torch.float16, torch.float64, torch.uint8, torch.complex64]


@st.composite
def weight_edits(draw, names: list[str]):
    """A list of edits to the weights: (kind, tensor name, argument)."""
    kinds = st.sampled_from(["dtype", "shape", "drop", "add", "nan", "inf", "scale"])
    return draw(st.lists(st.tuples(kinds, st.sampled_from(names), st.integers(0, 10**6)), min_size=1, max_size=3))


def _apply_weight_edits(tensors: dict[str, torch.Tensor], edits) -> None:
    for kind, name, arg in edits:
        if name not in tensors:
            continue
        t = tensors[name]
        if kind == "dtype":
            tensors[name] = t.to(DTYPES[arg % len(DTYPES)])
        elif kind == "shape":
            tensors[name] = t.reshape(-1)[: max(0, t.numel() - 1 - arg % 3)].clone() if arg % 2 else t.unsqueeze(0)
        elif kind == "drop":
            del tensors[name]
        elif kind == "add":
            tensors[f"extra{arg % 3}"] = torch.zeros(arg % 5)
        elif t.is_floating_point() and t.numel():
            flat = t.clone().reshape(-1)
            flat[arg % flat.numel()] = {"nan": float("nan"), "inf": float("inf"), "scale": 1e38}[kind]
            tensors[name] = flat.reshape(t.shape)


@st.composite
def hostile_models(draw, config: dict[str, Any], names: list[str]):
    """(config.json text, weights edits or None, file damage): the saved model with hostile changes."""
    record = json.loads(json.dumps(config))
    text = None
    what = draw(st.sampled_from(["config", "config", "weights", "weights", "file", "both"]))
    if what in ("config", "both"):
        if draw(st.integers(0, 5)) == 0:
            text = json.dumps(draw(json_values)) if draw(st.booleans()) else draw(st.text(max_size=30))
        else:
            section = draw(st.sampled_from(["sae", "sae", "sae", "train", "data", "top"]))
            key = draw(st.sampled_from([*record["sae"].keys(), "bogus"])) if section == "sae" else "x"
            value = draw(plausible | json_values)
            if section == "top":
                record[draw(st.sampled_from(["sae", "train", "data"]))] = value
            elif draw(st.booleans()) and section == "sae":
                record["sae"].pop(key, None)
            elif isinstance(record.get(section), dict):
                record[section][key] = value
    weights = draw(weight_edits(names)) if what in ("weights", "both") else None
    damage = None
    if what == "file":
        damage = draw(st.tuples(st.sampled_from(["truncate", "flip", "text", "empty"]), st.integers(0, 10**6)))
    return text if text is not None else json.dumps(record), weights, damage


def _damage_file(path: Path, damage) -> None:
    kind, arg = damage
    data = bytearray(path.read_bytes())
    if kind == "truncate":
        path.write_bytes(bytes(data[: arg % len(data)]))
    elif kind == "flip":
        data[arg % len(data)] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "text":
        path.write_text("W_enc = [[1, 2], [3, 4]]\n")
    else:
        path.write_bytes(b"")


_model_counts: Counter = Counter()
_cli_model_counts: Counter = Counter()


def _hostile_copy(model_folder: Path, data, workdir: Path) -> Path:
    config = json.loads((model_folder / "config.json").read_text())
    names = sorted(load_file(model_folder / "weights.safetensors"))
    text, weights, damage = data.draw(hostile_models(config, names))
    folder = workdir / "model"
    shutil.copytree(model_folder, folder)
    (folder / "config.json").write_text(text)
    if weights is not None:
        tensors = load_file(folder / "weights.safetensors")
        _apply_weight_edits(tensors, weights)
        save_file(tensors, str(folder / "weights.safetensors"), metadata={"arch": "topk"})
    if damage is not None:
        _damage_file(folder / "weights.safetensors", damage)
    return folder


@settings(SETTINGS, max_examples=150 * SCALE)
@given(data=st.data())
def test_hostile_model_folders_end_in_a_clean_error_and_change_nothing(model_folder, data):
    with tempfile.TemporaryDirectory() as workdir:
        folder = _hostile_copy(model_folder, data, Path(workdir))
        before = digest(Path(workdir))
        x = torch.randn(5, 8)

        def use(load):  # (a finite but huge weight is a model, whose outputs may overflow)
            model = load(folder)
            model.decode(model.encode(x))
            return model

        outcome(_model_counts, lambda: use(hsae.load), lambda: use(load_folder))
        assert digest(Path(workdir)) == before


def test_zz_model_counts():
    report("model folders (hsae.load and the hsae-folder loader)", _model_counts)


@settings(SETTINGS, max_examples=20 * SCALE)
@given(data=st.data())
def test_hostile_model_folders_at_the_command_line_are_one_line(model_folder, data, capsys):
    with tempfile.TemporaryDirectory() as workdir:
        folder = _hostile_copy(model_folder, data, Path(workdir))
        before = digest(folder)
        _cli_model_counts["cases"] += 1
        codes = [one_line_or_success(capsys, ["info", folder])]
        codes.append(
            one_line_or_success(capsys, ["eval", folder, "--tokens", "64", "-m", "core", "--out", Path(workdir) / "r"])
        )
        _cli_model_counts["clean error" if 2 in codes else "accepted"] += 1
        assert digest(folder) == before  # (the report went to another folder)


def test_zz_cli_model_counts():
    report("model folders at the command line (hsae info, hsae eval)", _cli_model_counts)
