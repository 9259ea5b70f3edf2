"""Hugging Face <-> native conversion: CLI round trips, folder formats, errors, distill_sbs.load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from _hf_t5 import (
    hf_generate,
    hf_logits,
    hf_state_dict,
    make_hf_model,
    random_tokens,
)
from _shared_data import T5_VOCAB

import distill_sbs
from distill_sbs import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPIECE = str(T5_VOCAB)  # the vocabulary the package ships


def _cli(*args: str) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "distill_sbs.convert", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def _save_hf(model, path: str, fmt: str = "safetensors") -> str:
    if fmt == "safetensors":
        model.save_pretrained(path)
    else:  # the legacy torch pickle format
        os.makedirs(path, exist_ok=True)
        model.config.to_json_file(os.path.join(path, "config.json"))
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
    shutil.copyfile(SPIECE, os.path.join(path, "spiece.model"))
    return path


@pytest.mark.parametrize(
    "variant,fmt", [("t5_1_1", "safetensors"), ("t5_1_0", "safetensors"), ("t5_1_1", "bin")]
)
def test_cli_round_trip(tmp_path, variant, fmt):
    hf = make_hf_model(variant, seed=5, eos_bias=0.0)
    hf_dir = _save_hf(hf, str(tmp_path / "hf"), fmt)
    native = str(tmp_path / "native")
    back = str(tmp_path / "back")

    r = _cli("hf-to-native", "--hf_dir", hf_dir, "--out", native)
    assert r.returncode == 0, r.stderr
    assert os.path.isdir(os.path.join(native, "params"))

    # the converted checkpoint is self-describing and reproduces HF
    model, params = distill_sbs.load(native)
    assert model.config.logits_via_embedding == (variant == "t5_1_0")
    rng = np.random.default_rng(0)
    enc = random_tokens(rng, [14, 6], 14)
    dec = np.concatenate([np.zeros((2, 1), np.int32), random_tokens(rng, [9, 4], 9)], 1)
    np.testing.assert_allclose(
        np.asarray(jax.jit(model.logits)(params, enc, dec)), hf_logits(hf, enc, dec), atol=1e-4
    )
    np.testing.assert_array_equal(
        np.asarray(model.generate(params, enc, max_decode_length=8)), hf_generate(hf, enc, 8)
    )

    r = _cli("native-to-hf", "--checkpoint", native, "--out", back)
    assert r.returncode == 0, r.stderr
    reloaded, info = transformers.T5ForConditionalGeneration.from_pretrained(
        back, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    original, again = hf_state_dict(hf), hf_state_dict(reloaded)
    assert set(original) == set(again)
    for key, value in original.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    assert (reloaded.lm_head.weight is reloaded.shared.weight) == (variant == "t5_1_0")
    assert os.path.exists(os.path.join(back, "spiece.model"))


def test_vocabulary_travels_and_text_helpers(tmp_path):
    hf_dir = _save_hf(make_hf_model("t5_1_1"), str(tmp_path / "hf"))
    convert.hf_to_native(hf_dir, str(tmp_path / "native"))
    model, _ = distill_sbs.load(str(tmp_path / "native"))
    assert model.vocabulary is not None and model.vocabulary.vocab_size == 32100
    ids = model.encode_texts(["The answer is train station.", "a b c d e f g h i j k"], 6)
    assert ids.shape == (2, 6) and ids.dtype == np.int32
    assert ids[1, -1] == 1 and ids[0, -1] in (0, 1)
    full = model.encode_texts(["The answer is train station."], 32)
    assert model.decode_tokens(full) == ["The answer is train station."]


def test_load_hf_folder_directly_and_sharded(tmp_path):
    hf = make_hf_model("t5_1_1")
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert any(f.endswith(".index.json") for f in os.listdir(tmp_path / "sharded"))
    model, params = distill_sbs.load(str(tmp_path / "sharded"))
    expected = convert.hf_state_dict_to_params(hf_state_dict(hf), model.config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)


def test_shape_mismatch_names_the_tensor(tmp_path):
    hf_dir = _save_hf(make_hf_model("t5_1_1"), str(tmp_path / "hf"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["d_ff"] = 48
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(convert.ConversionError, match=r"DenseReluDense\.wi_0\.weight.*\(48, 32\)"):
        convert.load_hf_folder(hf_dir)
    r = _cli("hf-to-native", "--hf_dir", hf_dir, "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in r.stderr


def test_config_errors_and_unknown_tensors():
    base = make_hf_model("t5_1_1").config.to_dict()
    with pytest.raises(convert.ConversionError, match="feed_forward_proj"):
        convert.hf_config_to_t5config({**base, "feed_forward_proj": "gated-mish"})
    with pytest.raises(convert.ConversionError, match="'d_model'"):
        convert.hf_config_to_t5config({k: v for k, v in base.items() if k != "d_model"})
    hf = make_hf_model("t5_1_0")
    config = convert.hf_config_to_t5config(hf.config.to_dict())
    state = hf_state_dict(hf)
    state["encoder.block.9.layer.0.layer_norm.weight"] = np.ones(32, np.float32)
    with pytest.raises(convert.ConversionError, match=r"encoder\.block\.9"):
        convert.hf_state_dict_to_params(state, config)
    del state["encoder.block.9.layer.0.layer_norm.weight"]
    del state["decoder.final_layer_norm.weight"]
    with pytest.raises(
        convert.ConversionError, match=r"decoder\.final_layer_norm\.weight.*missing"
    ):
        convert.hf_state_dict_to_params(state, config)


def test_config_round_trip_for_each_variant():
    for variant, proj in (("t5_1_0", "relu"), ("t5_1_1", "gated-gelu")):
        config = convert.hf_config_to_t5config(make_hf_model(variant).config.to_dict())
        hf_cfg = convert.t5config_to_hf_config(config)
        assert hf_cfg["feed_forward_proj"] == proj
        assert convert.hf_config_to_t5config(hf_cfg) == config
    # transformers 4 style config (tie_word_embeddings false means untied and unscaled)
    old = {
        "model_type": "t5",
        "vocab_size": 32128,
        "d_model": 512,
        "d_kv": 64,
        "d_ff": 1024,
        "num_layers": 8,
        "num_heads": 6,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
    }
    config = convert.hf_config_to_t5config(old)
    assert config.mlp_activations == ("gelu", "linear") and not config.logits_via_embedding


@pytest.mark.parametrize(
    "args,message",
    [
        ((), f"expected one command, {' or '.join(convert.COMMANDS)}; got []"),
        (("hf-to-native", "--out", "/tmp/x"), "hf-to-native needs --hf_dir and --out"),
        (
            ("native-to-hf", "--hf_dir=/a", "--checkpoint", "/b", "--out=/c"),
            "native-to-hf reads --checkpoint, not --hf_dir",
        ),
    ],
)
def test_cli_usage_errors(args, message):
    r = _cli(*args)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == f"error: {message}"


# ------------------------------------------------------------------ issue 9: exports and checks


@pytest.fixture(scope="module")
def t5_export(tmp_path_factory):
    """(native checkpoint, its native-to-hf export): a tiny random T5 1.1 over the packaged T5
    vocabulary (32100 ids: 32000 pieces and 100 extra ids)."""
    from _tiny_t5 import tiny_config

    from distill_sbs.checkpoints import save_native
    from distill_sbs.data.options import DEFAULT_T5_VOCAB
    from distill_sbs.models import EncoderDecoderModel

    root = tmp_path_factory.mktemp("t5_export")
    cfg = tiny_config(vocab_size=32100)
    native, export = str(root / "native"), str(root / "export")
    params = EncoderDecoderModel(cfg).init_params(jax.random.PRNGKey(3))
    save_native(native, params, cfg, DEFAULT_T5_VOCAB)
    old = os.umask(0o022)
    try:
        convert.native_to_hf(native, export)
    finally:
        os.umask(old)
    return native, export


def test_export_works_with_auto_classes_and_generates_the_same_text(t5_export):
    native, export = t5_export
    texts = ["The answer is train station.", "Why do birds fly south?", "2 + 3 ="]
    model, params = distill_sbs.load(native)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(export).eval()
    # the tokenizer reads text as the native vocabulary does
    enc = model.encode_texts(texts, 16)
    hf_in = tokenizer(texts, return_tensors="pt", padding="max_length", max_length=16)
    np.testing.assert_array_equal(hf_in.input_ids.numpy(), enc)
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == 32099 and len(tokenizer) == 32100

    ours = np.asarray(model.generate(params, enc, max_decode_length=8))
    with torch.no_grad():
        theirs = hf.generate(**hf_in, do_sample=False, num_beams=1, max_new_tokens=8)
    # HF starts with decoder_start_token_id (from generation_config.json) and pads after EOS
    np.testing.assert_array_equal(theirs.numpy()[:, 1:], ours[:, : theirs.shape[1] - 1])
    assert (ours > 2).any() and (ours < 32000).all(), ours  # real pieces, so the texts mean
    # something (sentinels decode differently: seqio gives no text, HF drops them as special)
    decoded = tokenizer.batch_decode(theirs, skip_special_tokens=True)
    assert decoded == model.decode_tokens(ours) and any(decoded)


def test_export_files_and_modes(t5_export):
    _, export = t5_export
    names = sorted(os.listdir(export))
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "spiece.model",
        "tokenizer_config.json",
    ]
    for name in names:  # created under umask 022: readable by all, as any other file
        assert os.stat(os.path.join(export, name)).st_mode & 0o777 == 0o644, name
    gen = transformers.GenerationConfig.from_pretrained(export)
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id) == (0, 1, 0)


def test_tokenizer_json_only_folder_takes_the_packaged_vocabulary(t5_export, tmp_path, caplog):
    from distill_sbs.data.options import DEFAULT_T5_VOCAB

    _, export = t5_export
    hf_dir = str(tmp_path / "hf")
    make_hf_model("t5_1_1").save_pretrained(hf_dir)  # no tokenizer files
    transformers.AutoTokenizer.from_pretrained(export).save_pretrained(str(tmp_path / "tok"))
    tokenizer_json = os.path.join(hf_dir, "tokenizer.json")
    shutil.copyfile(tmp_path / "tok" / "tokenizer.json", tokenizer_json)
    assert not os.path.exists(os.path.join(hf_dir, "spiece.model"))

    convert.hf_to_native(hf_dir, str(tmp_path / "native"))
    with open(tmp_path / "native" / "config.json") as f:
        assert json.load(f)["vocabulary"] == {"file": "spiece.model", "extra_ids": 100}
    with open(tmp_path / "native" / "spiece.model", "rb") as a, open(DEFAULT_T5_VOCAB, "rb") as b:
        assert a.read() == b.read()

    # another vocabulary: one piece differs
    with open(tokenizer_json) as f:
        tok = json.load(f)
    tok["model"]["vocab"][500][0] = "▁not-t5"
    with open(tokenizer_json, "w") as f:
        json.dump(tok, f)
    with pytest.raises(convert.ConversionError, match=r"tokenizer\.json: id 500 is '▁not-t5'"):
        convert.hf_to_native(hf_dir, str(tmp_path / "native2"))
    assert not os.path.exists(tmp_path / "native2")

    # no tokenizer at all: converted, with a warning that the checkpoint has no vocabulary
    os.remove(tokenizer_json)
    caplog.set_level("WARNING")
    convert.hf_to_native(hf_dir, str(tmp_path / "native3"))
    assert "no spiece.model or tokenizer.json" in caplog.text


def _write_hf_folder(path, state, config: dict) -> str:
    from safetensors.numpy import save_file

    os.makedirs(path)
    save_file(state, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def test_missing_lm_head_is_an_error_unless_the_config_ties_it(tmp_path):
    hf = make_hf_model("t5_1_1")
    state = {k: v for k, v in hf_state_dict(hf).items() if k != "lm_head.weight"}
    config = {**hf.config.to_dict(), "tie_word_embeddings": False}  # transformers 4 T5 1.1
    untied = _write_hf_folder(tmp_path / "untied", state, config)
    with pytest.raises(convert.ConversionError, match=r"'lm_head\.weight' is missing"):
        convert.load_hf_folder(untied)
    with pytest.raises(convert.ConversionError, match=r"'lm_head\.weight' is missing"):
        convert.hf_to_native(untied, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")
    # transformers 5 ties lm_head to the embedding and then saves only the embedding
    tied = _write_hf_folder(tmp_path / "tied", state, {**config, "tie_word_embeddings": True})
    _, params, _ = convert.load_hf_folder(tied)
    np.testing.assert_array_equal(params["logits_dense"]["kernel"], state["shared.weight"].T)


def test_nan_and_integer_weights_name_the_tensor():
    hf = make_hf_model("t5_1_1")
    config = convert.hf_config_to_t5config(hf.config.to_dict())
    good = hf_state_dict(hf)
    key = "decoder.block.1.layer.2.DenseReluDense.wo.weight"
    nan = dict(good, **{key: np.where(np.eye(*good[key].shape) > 0, np.nan, good[key])})
    with pytest.raises(convert.ConversionError, match=rf"'{key}' has \d+ NaN or infinite"):
        convert.hf_state_dict_to_params(nan, config)
    ints = dict(good, **{key: good[key].astype(np.int64)})
    with pytest.raises(convert.ConversionError, match=rf"'{key}' has dtype int64"):
        convert.hf_state_dict_to_params(ints, config)
    params = convert.hf_state_dict_to_params(good, config)
    params["encoder"]["encoder_norm"]["scale"][3] = np.inf
    with pytest.raises(convert.ConversionError, match="params encoder/encoder_norm/scale has 1"):
        convert.params_to_hf_state_dict(params, config)


def test_out_overlapping_the_input_is_refused_before_writing(t5_export, tmp_path):
    native, export = t5_export
    hf_dir = _save_hf(make_hf_model("t5_1_1"), str(tmp_path / "hf"))

    def tree(path):
        return sorted((r, tuple(sorted(f))) for r, _, f in os.walk(path))

    before = tree(tmp_path), tree(native)
    for source, out, fn in [
        (hf_dir, hf_dir, convert.hf_to_native),
        (hf_dir, os.path.join(hf_dir, "native"), convert.hf_to_native),
        (hf_dir, str(tmp_path), convert.hf_to_native),
        (native, native + "/", convert.native_to_hf),
        (native, os.path.join(native, "params", "hf"), convert.native_to_hf),
        (os.path.join(native, "."), os.path.dirname(native), convert.native_to_hf),
    ]:
        with pytest.raises(convert.ConversionError, match="overlaps the input"):
            fn(source, out)
    assert (tree(tmp_path), tree(native)) == before
    distill_sbs.load(native)  # still whole
