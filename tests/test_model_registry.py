"""The model registry: every model's facts live in its own file, and no other code names a model.

- No string literal equal to a registered model's name appears in the platform's code outside the model's own file
  (docstrings, comments, tests, configs, docs and bench/'s peer mappings may name them).
- Every registered model is complete: a ranker builds and scores a KJT of the features it declares; every model's
  item table is a key of its state dict; its defaults make valid TrainOptions.
- Options are checked against the model's config fields; the artifact format round-trips through ``load_model``.
"""

from __future__ import annotations

import dataclasses
import io
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch

from features.config import ROOT
from training.registry import (ModelOptionError, UnknownModelError, get_model, list_models, model_names,
                               register)

#: Code that may name models: their own files (checked per model), and what is not platform code.
EXEMPT = ("tests", "bench", "docs", "infra", ".venv", ".venv-airflow", "data", "artifacts", "var", ".jars")
#: The configuration names the models that serve by default (``features.config.ModelsConfig``).
EXEMPT_FILES = (Path("features/config.py"),)


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string literal in ``path`` that is not a docstring (an expression statement)."""
    out, previous = [], tokenize.NEWLINE
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.STRING:
            nxt = next((t for t in tokens[i + 1:] if t.type not in (tokenize.NL, tokenize.COMMENT)), None)
            statement = previous in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) and nxt is not None \
                and nxt.type in (tokenize.NEWLINE, tokenize.ENDMARKER)
            if not statement:
                try:
                    out.append((tok.start[0], str(eval(tok.string, {}))))  # noqa: S307 -- a literal token only
                except Exception:  # f-strings and the like: not a plain model name
                    pass
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            previous = tok.type
    return out


def test_no_model_name_outside_its_own_file():
    names = set(model_names())
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in EXEMPT or rel.parts[0].startswith(".") or rel in EXEMPT_FILES:
            continue
        own = rel.parts[:2] == ("training", "models") and rel.stem in names
        for line, value in _code_strings(path):
            if value in names and not (own and value == rel.stem):
                found.append(f"{rel}:{line}: {value!r}")
    assert not found, "model names outside their own files (use the registry):\n" + "\n".join(found)


def test_the_name_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""A docstring naming deepfm is fine."""\nx = "din"  # a literal is not\n')
    assert [v for _, v in _code_strings(bad)] == ["din"]


def test_every_model_file_registers_its_model():
    assert set(model_names()) == set(list_models())
    for name in list_models():
        spec = get_model(name)
        assert spec.name == name and spec.build.__module__ == f"training.models.{name}"


@pytest.mark.parametrize("name", model_names())
def test_registered_model_is_complete(name):
    from training.data import kjt_of_rows, synthetic_vocab_sizes
    from training.trainer import TrainOptions

    spec = get_model(name)
    config = spec.default_config()
    model = spec.build(synthetic_vocab_sizes(), config)
    state = model.state_dict()
    if spec.item_table is not None:
        assert state[spec.item_table].shape[0] == synthetic_vocab_sizes()["item"]
    for table, features in spec.id_tables.items():
        assert any(k.endswith(f".{table}.weight") for k in state), table
    opts = TrainOptions(model=name)
    assert opts.epochs == spec.train.epochs and opts.lr_sparse == spec.train.lr_sparse
    if spec.features is not None:  # a model trained on the CTR samples scores a KJT of the features it declares
        row = {"user_idx": 1, "item_idx": 2, "age_idx": 1, "gender_idx": 1, "occupation_idx": 3, "zip_idx": 4,
               "genre_idx": [1, 2], "hist_item_idx": [3, 4], "hist_rating": [5, 1]}
        assert spec.id_dropout_features and set(spec.id_dropout_features) <= {f.name for f in spec.features_of(config)}
        with torch.no_grad():
            assert model.eval()(kjt_of_rows([row] * 3, spec.features_of(config))).shape == (3,)


def test_unknown_model_and_option_are_errors_that_name_the_choices():
    with pytest.raises(UnknownModelError, match="registered: .*deepfm, .*din"):
        get_model("deepmf")
    with pytest.raises(ModelOptionError, match="has no option.*'hiden'.*'hidden'"):
        get_model("deepfm").make_config({"hiden": "8"})
    with pytest.raises(ModelOptionError, match="not a int"):
        get_model("deepfm").make_config({"embedding_dim": "sixteen"})
    with pytest.raises(ModelOptionError, match="multiple of 4"):
        get_model("deepfm").make_config({"embedding_dim": "6"})
    assert get_model("din").make_config({"hidden": "100,50", "history_ratings": "false"}).hidden == (100, 50)


def test_train_options_check_options_against_the_models_config():
    from training.trainer import TrainOptions

    assert TrainOptions(model="item2vec", model_options={"window": "3"}).config_options() == {"window": "3"}
    with pytest.raises(ModelOptionError, match="window"):
        TrainOptions(model="deepfm", model_options={"window": "3"})
    with pytest.raises(UnknownModelError):
        TrainOptions(model="nope")


def test_a_model_must_live_in_its_own_file():
    spec = get_model("deepfm")
    with pytest.raises(ValueError, match="training/models/other.py"):
        register(dataclasses.replace(spec, name="other"))


@pytest.mark.parametrize("name", model_names())
def test_artifact_format_round_trips(name, tmp_path):
    from training.artifacts import ModelLayout, load_item_embeddings, load_model, save_model
    from training.data import synthetic_vocab_sizes

    spec = get_model(name)
    config = spec.default_config()
    torch.manual_seed(0)
    model = spec.build(synthetic_vocab_sizes(), config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_model(tmp_path / name, spec, config, state, model_version=f"{name}-1", options={"seed": 0},
               vocab_sizes=synthetic_vocab_sizes(), sharding_plan={"t": "table_wise@rank0"}, metrics={"m": 0.5},
               training_versions={"gold.ctr_samples": 3})
    loaded = load_model(tmp_path / name)
    assert loaded.spec is spec and loaded.config == config and loaded.version == f"{name}-1"
    assert all(torch.equal(v, loaded.module.state_dict()[k]) for k, v in state.items())
    assert loaded.meta["training_versions"] == {"gold.ctr_samples": 3} and loaded.meta["kind"] == spec.kind
    assert not list(ModelLayout(tmp_path / name).root.glob("*.tmp*"))  # written whole, renamed into place
    if spec.item_table is not None:
        table, meta = load_item_embeddings(tmp_path / name)
        want = spec.item_vectors(state, config) if spec.item_vectors else state[spec.item_table].numpy()
        np.testing.assert_array_equal(table, want)
        assert meta["model"] == name


def test_stages_and_dags_train_every_registered_model():
    from pipelines.stages import STAGES
    from pipelines.stages import model_names as listed

    assert listed() == model_names()
    assert [s.name for s in STAGES if s.name.startswith("train_")] == [f"train_{m}" for m in model_names()]
