"""save_pruned: a from_pretrained-loadable folder with the same zeros, masks by safetensors, atomic replace."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from conftest import word_llama, word_tokenizer

import apt_viz.save as save_mod
from apt_viz import Pruner, PruningPlan
from apt_viz.save import MASKS_FILE, RUN_FILE, check_save_target, load_masks, load_record, save_pruned


@pytest.fixture(scope="module")
def pruned():
    """A tiny random Llama pruned 2:4 by SparseGPT, its tokenizer and its pruner."""
    tok = word_tokenizer(40)
    model = word_llama(tok)
    calib = torch.randint(3, len(tok), (4, 16), generator=torch.Generator().manual_seed(0))
    pruner = Pruner(model)
    pruner.run(calib, PruningPlan(method="sparsegpt", pattern="2:4"), progress=False)
    return model, tok, pruner


def _record(pruner: Pruner) -> dict:
    return {"plan": pruner.plan.to_dict(), "seed": 0, "nsamples": 4, "seqlen": 16,
            "layers": [r.to_dict() for r in pruner.results.values()], "perplexity": {"text": {"dense": 2.0, "pruned": 3.0}}}


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_save_then_from_pretrained_is_bit_identical(tmp_path, pruned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, pruner = pruned
    out = save_pruned(model, tok, tmp_path / "saved", masks=pruner.masks, record=_record(pruner))
    assert {MASKS_FILE, RUN_FILE, "config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temporary sibling left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not the private mode of a temp folder

    loaded = AutoModelForCausalLM.from_pretrained(out)
    original = model.state_dict()
    reloaded = loaded.state_dict()
    assert set(reloaded) == set(original)
    for name, t in original.items():
        assert reloaded[name].dtype == t.dtype and torch.equal(reloaded[name], t), name

    masks = load_masks(out)
    assert set(masks) == set(pruner.masks) == set(pruner.layer_names)
    for name, m in masks.items():
        assert m.dtype == torch.bool and torch.equal(m, pruner.masks[name])
        w = reloaded[name + ".weight"]
        assert torch.equal(m, w != 0)  # the same zeros as the pruned model
        assert (w.reshape(-1, 4) == 0).sum(1).eq(2).all()  # 2:4 survives the round trip
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()


def test_run_json_records_plan_settings_results_and_versions(tmp_path, pruned):
    import transformers

    model, tok, pruner = pruned
    out = save_pruned(model, tok, tmp_path / "saved", masks=pruner.masks, record=_record(pruner))
    rec = load_record(out)
    assert PruningPlan.from_dict(rec["plan"]).pattern == "2:4"
    assert (rec["seed"], rec["nsamples"], rec["seqlen"]) == (0, 4, 16)
    assert rec["versions"] == {"apt_viz": "0.1.0", "torch": torch.__version__, "transformers": transformers.__version__}
    assert [r["name"] for r in rec["layers"]] == list(pruner.results)
    assert rec["layers"][0]["rel_error"] == pruner.results[rec["layers"][0]["name"]].rel_error
    assert rec["perplexity"] == {"text": {"dense": 2.0, "pruned": 3.0}}


def test_crash_while_writing_leaves_the_old_save_intact(tmp_path, pruned, monkeypatch):
    model, tok, pruner = pruned
    out = save_pruned(model, tok, tmp_path / "saved", masks=pruner.masks, record={"tag": "old"})
    before = _snapshot(out)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save_mod, "save_file", boom)  # the masks write fails after the weights were written
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, tok, out, masks=pruner.masks, record={"tag": "new"})
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]


def test_crash_during_the_swap_puts_the_old_save_back(tmp_path, pruned, monkeypatch):
    model, tok, pruner = pruned
    out = save_pruned(model, tok, tmp_path / "saved", masks=pruner.masks, record={"tag": "old"})
    before = _snapshot(out)
    real_replace = save_mod.os.replace

    def replace(src, dst):
        if ".saving-" in str(src):  # the new folder cannot be renamed into place
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(save_mod.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_pruned(model, tok, out, masks=pruner.masks, record={"tag": "new"})
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]


def test_second_save_replaces_the_first(tmp_path, pruned):
    model, tok, pruner = pruned
    out = save_pruned(model, tok, tmp_path / "saved", masks=pruner.masks, record={"tag": "old"})
    save_pruned(model, tok, out, masks={}, record={"tag": "new"})
    assert load_record(out)["tag"] == "new" and load_masks(out) == {}
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path, pruned):
    model, tok, pruner = pruned
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier apt_viz save"):
        save_pruned(model, tok, other, masks=pruner.masks, record={})
    assert (other / "notes.txt").read_text() == "keep me" and len(list(other.iterdir())) == 1
    (other / RUN_FILE).write_text(json.dumps({"plan": {}}))  # a run.json from something else
    with pytest.raises(FileExistsError):
        check_save_target(other)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        check_save_target(afile)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert save_pruned(model, tok, empty, masks=pruner.masks, record={}) == empty


def test_load_masks_reads_safetensors_only(tmp_path, pruned, monkeypatch):
    model, tok, pruner = pruned
    out = save_pruned(model, tok, tmp_path / "saved", masks=pruner.masks, record={})

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    assert set(load_masks(out)) == set(pruner.masks)
    with pytest.raises(FileNotFoundError, match="apt-viz prune --save"):
        load_masks(tmp_path)
