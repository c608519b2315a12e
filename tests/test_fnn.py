"""FNN: the logit by hand from its parts (z = each field's (w_i, v_i) and the dense features, a DNN, one output
unit); the trainer's init step (``ModelSpec.init_from``) copies exactly a saved FM's tables -- latent vectors and
first-order weights, nothing else -- into the unsharded model and into a row-wise sharded one over 2 gloo ranks;
tables of another shape and a missing FM are errors that name the fix; a resumed run is not re-initialised; the
config's checks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from _spawn import free_port, mark_done, spawn_checked
from training.artifacts import ModelOutputError, load_model, model_dir, save_model
from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.models.fm import FM, FMConfig
from training.models.fm import SPEC as FM_SPEC
from training.models.fnn import FNN, FNNConfig
from training.models.fnn import SPEC as FNN_SPEC
from training.registry import ModelOptionError
from training.trainer import ModelInitError, _resume_or_init, init_source, init_tables

VOCAB = synthetic_vocab_sizes()
DENSE = ("user_prior_rating", "item_prior_events")
FEATURES = ("user_idx", "item_idx", "age_idx", "gender_idx", "occupation_idx", "zip_idx", "genre_idx")


def _rows() -> list[dict]:
    return [{"user_idx": 1, "item_idx": 2, "age_idx": 3, "gender_idx": 1, "occupation_idx": 5, "zip_idx": 4,
             "genre_idx": [2, 7]},
            {"user_idx": 4, "item_idx": 9, "age_idx": 0, "gender_idx": 2, "occupation_idx": 1, "zip_idx": 2,
             "genre_idx": []}]


def _trained_fm(run_dir, config: FMConfig = FMConfig(), vocab: dict = VOCAB) -> dict:
    """An FM with random latent vectors and first-order weights (a stand-in for a trained one), saved into
    ``run_dir`` as the trainer saves it; returns its state."""
    torch.manual_seed(1)
    fm = FM(vocab, config)
    with torch.no_grad():
        for key, p in fm.named_parameters():
            if "first_order" in key:  # they start at 0: make them count
                p.normal_(0, 0.3)
    state = {k: v.detach().clone() for k, v in fm.state_dict().items()}
    save_model(model_dir(run_dir, FM_SPEC.name), FM_SPEC, config, state, model_version="fm-20240101T000000Z",
               options={}, vocab_sizes=vocab, sharding_plan={}, metrics={}, training_versions={})
    return state


@torch.no_grad()
def test_logit_is_a_dnn_over_each_fields_first_order_weight_and_latent_vector():
    torch.manual_seed(0)
    config = FNNConfig(embedding_dim=4, hidden=(8, 4), init_range=0.5, dense_features=DENSE)
    model = FNN(VOCAB, config).eval()
    for bag in model.interaction_arch.first_order.weights.values():
        bag.weight.normal_(0, 0.3)
    kjt, dense = kjt_of_rows(_rows()), torch.tensor([[0.5, 1.0], [-1.0, 2.0]])  # (B, F_dense)
    logits = model(kjt, dense)
    assert logits.shape == (2,)
    assert model.dense_arch.layers[0].in_features == len(FEATURES) * (4 + 1) + 2  # d = F (D + 1) + F_dense
    tables = model.sparse_arch.embedding_bag_collection.embedding_bags
    first = model.interaction_arch.first_order.weights
    table_of = {"user_idx": "t_user", "item_idx": "t_item", "age_idx": "t_age", "gender_idx": "t_gender",
                "occupation_idx": "t_occupation", "zip_idx": "t_zip", "genre_idx": "t_genre"}
    for b, row in enumerate(_rows()):
        z = []
        for name in FEATURES:  # z_i = (w_i, v_i), a multi-hot field summed over its ids (none: zeros)
            ids = row[name] if isinstance(row[name], list) else [row[name]]
            t = table_of[name]
            z.append(sum((float(first[t].weight[i, 0]) for i in ids), 0.0))
            z.extend(sum((tables[t].weight[i] for i in ids), torch.zeros(4)).tolist())
        h = torch.tensor(z + dense[b].tolist())
        for layer in (model.dense_arch.layers[0], model.dense_arch.layers[2]):  # Linear, ReLU, Linear, ReLU
            h = torch.relu(layer.weight @ h + layer.bias)
        want = float(model.over_arch.weight[0] @ h) + model.over_arch.bias.item()
        torch.testing.assert_close(logits[b].item(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense"):
        model(kjt)
    assert FNN(VOCAB)(kjt).shape == (2,)  # sparse only


def test_init_copies_exactly_the_fms_tables(tmp_path):
    fm_state = _trained_fm(tmp_path)
    config = FNNConfig()
    init = init_source(FNN_SPEC, config, tmp_path, VOCAB)  # the driver's check, on a model built on meta
    assert init["model"] == FM_SPEC.name and init["model_version"] == "fm-20240101T000000Z"
    assert init["model_dir"] == str(model_dir(tmp_path, FM_SPEC.name))
    torch.manual_seed(0)
    model = FNN(VOCAB, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copied = init_tables(model, init["model_dir"], init["model_version"])
    assert copied == init["tables"]
    # the 7 latent tables and the 7 first-order tables, not FM's bias (FNN has none: b_1 absorbs w_0)
    assert sorted(copied) == sorted(k for k in fm_state if k != "interaction_arch.first_order.bias")
    assert len(copied) == 14
    after = model.state_dict()
    for key, value in after.items():
        if key in copied:
            assert torch.equal(value, fm_state[key]), key
            assert not torch.equal(value, before[key]), key  # really overwritten
        else:  # the DNN keeps its own init
            assert key.startswith(("dense_arch.", "over_arch.")) and torch.equal(value, before[key]), key
    # z's first column of each field is the FM's first-order weight, the next D its latent vector
    kjt = kjt_of_rows(_rows())
    with torch.no_grad():
        z = model.interaction_arch(kjt, model.sparse_arch(kjt)).view(2, len(FEATURES), 17)
    fm = load_model(init["model_dir"]).module
    with torch.no_grad():
        torch.testing.assert_close(z[:, :, 1:], fm.sparse_arch(kjt))
        torch.testing.assert_close(z[:, :, 0].sum(1) + fm.interaction_arch.first_order.bias,
                                   fm.interaction_arch.first_order(kjt))


def test_tables_of_another_shape_are_refused(tmp_path):
    _trained_fm(tmp_path, FMConfig(embedding_dim=8))
    with pytest.raises(ModelInitError, match=r"t_user.weight: \(30, 16\) here, \(30, 8\) saved.*embedding_dim.*"
                                             r"python -m training\.train --model fm"):
        init_source(FNN_SPEC, FNNConfig(), tmp_path, VOCAB)  # FNN at D = 16, the FM at 8: fails in the driver
    model = FNN(VOCAB, FNNConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelInitError, match="do not fit"):
        init_tables(model, model_dir(tmp_path, FM_SPEC.name))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half copied
    assert init_source(FNN_SPEC, FNNConfig(embedding_dim=8), tmp_path, VOCAB)["tables"]  # the FM's D fits
    with pytest.raises(ModelInitError, match=r"t_item.weight: \(41, 8\) here, \(40, 8\) saved"):  # a vocabulary
        init_source(FNN_SPEC, FNNConfig(embedding_dim=8), tmp_path, {**VOCAB, "item": 41})


def test_missing_fm_names_the_command_to_run_first(tmp_path):
    with pytest.raises(ModelOutputError, match=r"no trained model; run `python -m training\.train --model fm` "
                                               r"first"):
        init_source(FNN_SPEC, FNNConfig(), tmp_path, VOCAB)
    assert FNN_SPEC.init_source(FNN_SPEC.make_config({"init_from_fm": "false"})) is None
    assert init_source(FNN_SPEC, FNNConfig(init_from_fm=False), tmp_path, VOCAB) is None  # random: no FM needed
    assert init_source(FM_SPEC, FMConfig(), tmp_path, VOCAB) is None  # a model without init_from


def test_a_resumed_run_is_not_reinitialised(tmp_path, monkeypatch):
    """``_resume_or_init`` with the checkpoint look-up faked: after a restart the tables stay those the checkpoint
    loaded (here: the model's own); on a fresh start they are the FM's."""
    import training.trainer as trainer

    fm_state = _trained_fm(tmp_path)
    init = init_source(FNN_SPEC, FNNConfig(), tmp_path, VOCAB)
    key = "sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight"
    model = FNN(VOCAB, FNNConfig())
    own = model.state_dict()[key].clone()
    monkeypatch.setattr(trainer, "_resume", lambda dmp, rank: {"epoch": 3})
    assert _resume_or_init(model, 0, init) == {"epoch": 3}
    assert torch.equal(model.state_dict()[key], own)
    monkeypatch.setattr(trainer, "_resume", lambda dmp, rank: None)
    assert _resume_or_init(model, 0, init) is None
    assert torch.equal(model.state_dict()[key], fm_state[key])
    with pytest.raises(ModelOutputError, match="retrained meanwhile"):  # the driver checked another version
        _resume_or_init(model, 0, {**init, "model_version": "fm-older"})


def _sharded_worker(rank: int, port: int, run_dir: str, done_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from training.distributed import ShardingConfig, gather_full_state_dict, plan_sharding, shard_model

    fm_state = torch.load(model_dir(run_dir, FM_SPEC.name) / "model.pt", weights_only=True)
    model = FNN(VOCAB, FNNConfig(), torch.device("meta"))
    dmp = shard_model(model, plan_sharding(model, 2, ShardingConfig(strategy="row_wise")))
    copied = init_tables(dmp, model_dir(run_dir, FM_SPEC.name))
    assert len(copied) == 14
    full = gather_full_state_dict(dmp)
    if rank == 0:
        for key in copied:
            assert torch.equal(full[key], fm_state[key]), key
    dist.destroy_process_group()
    mark_done(done_dir, rank)


@pytest.mark.integration
def test_init_copies_into_row_wise_shards(tmp_path):
    _trained_fm(tmp_path)
    done = tmp_path / "done"
    done.mkdir()
    spawn_checked(_sharded_worker, (free_port(), str(tmp_path)), 2, done)


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of 4"):
        FNNConfig(embedding_dim=18)
    with pytest.raises(ValueError, match="hidden layer"):
        FNNConfig(hidden=())
    with pytest.raises(ValueError, match="dropout"):
        FNNConfig(dropout=1.0)
    with pytest.raises(ValueError, match="init_range"):
        FNNConfig(init_range=-0.1)
    assert FNN_SPEC.make_config({"init_from_fm": "false", "hidden": "64,32"}) == FNNConfig(init_from_fm=False,
                                                                                           hidden=(64, 32))
    with pytest.raises(ModelOptionError, match="init_from_fm"):
        FNN_SPEC.make_config({"init_from_fm": "maybe"})
