"""Weights in and out: the original's delta checkpoint imports into a bundle that computes what the
original computed, goes back bit for bit, and exports to a Hugging Face folder.

The checkpoint is built here at tiny size from the original's own module structure
(``model/layers.py:TextFcLayer``, ``anyToImageVideoAudio.py``: ``llama_proj``, the resized LLaMA
matrices, peft LoRA on q/k/v/o) and saved with its key layout (``agent.py:save_model``), peft
0.3's LoRA names included.
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from nextgpt.convert.__main__ import export_legacy, export_to_hf, import_legacy, load_bundle_model, main
from nextgpt.convert.legacy import legacy_tokens
from nextgpt.model import build_nextgpt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class TextFcLayer(nn.Module):
    """The original's output projector (``mode='transformer'``), as it is written there."""

    def __init__(self, in_dim, out_dim, num_output_tokens, d_model, nhead, n_enc, n_dec, ff):
        super().__init__()
        self.fc = nn.Linear(in_dim, d_model)
        self.tfm = nn.Transformer(batch_first=True, norm_first=True, d_model=d_model, num_encoder_layers=n_enc,
                                  num_decoder_layers=n_dec, dim_feedforward=ff, dropout=0.0, nhead=nhead)
        self.model = nn.Linear(d_model, out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, num_output_tokens, d_model))

    def forward(self, x, input_embs):
        x = self.fc(x + input_embs)
        return self.model(self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1)))


PREFIX = {"image": "gen_text_hidden_fcs", "video": "gen_text_hidden_fcs_video", "audio": "gen_text_hidden_fcs_audio"}


@pytest.fixture(scope="module")
def original(tiny_cache, tmp_path_factory):
    """(checkpoint path, the original model's parts, overrides, our reference model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nextgpt.config import compose

    tmp = tmp_path_factory.mktemp("legacy")
    overrides = ["model=tiny", f"paths.root={tmp}", f"paths.cache_dir={tiny_cache}"]
    cfg = compose(["experiment=nextgpt_legacy", "stage=3", *overrides], output_dir=str(tmp))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    ours, _, _ = build_nextgpt(model_cfg)  # only for the shapes and the base LLM
    torch.manual_seed(0)
    llm_path = model_cfg["llm"]["path"]
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    base_vocab = len(tokenizer)
    counts = {m: int(v["num_signal_tokens"]) for m, v in model_cfg["modalities"].items()}
    names = legacy_tokens(counts)
    tokenizer.add_tokens(names)
    llama = AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32)
    llama.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():  # the original trained every row: new ones, and the old ones moved a little
        for w in (llama.get_input_embeddings().weight, llama.get_output_embeddings().weight):
            w[base_vocab:] = torch.randn_like(w[base_vocab:]) * 0.05
            w[:base_vocab] += torch.randn_like(w[:base_vocab]) * 1e-3
    lora = model_cfg["lora"]
    llama = get_peft_model(llama, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                             target_modules=list(lora["target_modules"])))
    with torch.no_grad():
        for n, p in llama.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # trained adapters (peft starts them at zero)
    llama.eval()
    hidden = llama.config.hidden_size
    llama_proj = nn.Linear(ours.encoder.embed_dim, hidden)
    op = model_cfg["output_projector"]
    fcs = {m: TextFcLayer(hidden, p.out_fc.out_features, p.queries.shape[0], op["d_model"], op["nhead"],
                          op["num_encoder_layers"], op["num_decoder_layers"], op["dim_feedforward"]).eval()
           for m, p in ours.output_projectors.items()}
    ckpt = {f"llama_proj.{k}": v for k, v in llama_proj.state_dict().items()}
    for m, layer in fcs.items():
        ckpt.update({f"{PREFIX[m]}.0.{k}": v for k, v in layer.state_dict().items()})
    for k, v in llama.state_dict().items():
        if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight") or ".lora_" in k:
            ckpt["llama_model." + k.replace(".default.weight", ".weight")] = v  # peft 0.3's names
    path = tmp / "pytorch_model.pt"
    torch.save({k: v.clone() for k, v in ckpt.items()}, path)
    return {"path": path, "ckpt": ckpt, "llama": llama, "llama_proj": llama_proj, "fcs": fcs, "tokenizer": tokenizer,
            "base_vocab": base_vocab, "names": names, "overrides": overrides, "tmp": tmp}


@pytest.fixture(scope="module")
def bundle(original):
    return import_legacy(original["path"], original["tmp"] / "imported", original["overrides"])


def test_import_reports_every_key_and_keeps_moved_old_rows(original, bundle):
    import json

    report = json.loads((bundle / "import_report.json").read_text())
    assert set(report["mapped"]) == set(original["ckpt"]) and report["skipped"] == {}
    rows = report["old_vocabulary_rows"]
    assert rows["kept"] and rows["embed_rows_changed"] == original["base_vocab"] and rows["embed_max_abs_change"] > 0
    assert (bundle / "base_rows.safetensors").is_file()


def test_imported_bundle_computes_what_the_original_computed(original, bundle):
    model, tokenizer, _, _ = load_bundle_model(bundle)
    o = original
    V, names = o["base_vocab"], o["names"]
    legacy_id = {t: V + j for j, t in enumerate(names)}
    our_id = dict(zip(tokenizer.convert_ids_to_tokens(list(range(V, len(tokenizer)))), range(V, len(tokenizer))))
    text = o["tokenizer"]("### Human:", add_special_tokens=False)["input_ids"]
    answer = o["tokenizer"]("a red circle", add_special_tokens=False)["input_ids"]
    signals = [f"[IMG{i}]" for i in range(4)]
    # BOS, prompt, <Img> media </Img>, answer, the image signal group (legacy ids)
    legacy = [1, *text, legacy_id["<Img>"], 0, legacy_id["</Img>"], *answer, *(legacy_id[s] for s in signals)]
    media_at = 1 + len(text) + 1
    feature = torch.nn.functional.normalize(torch.randn(1, model.encoder.embed_dim), dim=-1)
    ids = torch.tensor([legacy])
    with torch.no_grad():  # the original's forward, from the checkpoint's own modules
        embeds = o["llama"].get_input_embeddings()(ids)
        embeds[0, media_at] = o["llama_proj"](feature)[0]
        out = o["llama"](inputs_embeds=embeds, output_hidden_states=True)
        s = len(legacy) - 4
        h = out.hidden_states[-1][:, s:]
        want_cond = o["fcs"]["image"](h, o["llama"].get_input_embeddings()(ids[:, s:]))
        ours_ids = torch.tensor([[our_id.get(names[t - V], t) if t >= V else t for t in legacy]])
        media_mask = torch.zeros_like(ours_ids, dtype=torch.bool)
        media_mask[0, media_at] = True
        got = model(ours_ids, media_mask=media_mask, media_features={"image": feature},
                    media_sequence=[("image", 0, True)], every_modality=False)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.logits[..., :V], out.logits[..., :V], **tol)
    for t in names:
        torch.testing.assert_close(got.logits[..., our_id[t]], out.logits[..., legacy_id[t]], **tol)
    torch.testing.assert_close(got.conditioning["image"], want_cond, **tol)


def test_round_trip_gives_back_every_tensor_bit_for_bit(original, bundle, tmp_path):
    path = export_legacy(bundle, tmp_path / "back.pt")
    back = torch.load(path, weights_only=True)
    assert list(back) == list(original["ckpt"])
    for k, v in original["ckpt"].items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_hf_export_gives_the_unmerged_models_logits(original, bundle, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_to_hf(bundle, tmp_path / "hf")
    merged = AutoModelForCausalLM.from_pretrained(out / "llm", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out / "llm")
    model, tokenizer, _, _ = load_bundle_model(bundle)
    assert len(tok) == len(tokenizer) == model.layout.vocab_size
    assert tok.convert_tokens_to_ids(["[IMG0]", "<Img>"]) == tokenizer.convert_tokens_to_ids(["[IMG0]", "<Img>"])
    ids = torch.tensor([tokenizer("### Human: a red circle\n### Assistant: [IMG0][IMG1][IMG2][IMG3]", add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        want = model(ids, every_modality=False).logits
        got = merged(ids).logits
    V = model.layout.first_new_id
    print(f"merged vs unmerged logits: max |diff| {float((got - want).abs().max()):.2e} (logit scale "
          f"{float(want.abs().max()):.2f})")
    torch.testing.assert_close(got[..., :V], want[..., :V], atol=1e-4, rtol=1e-4)  # the original vocabulary
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # and the new tokens
    assert (out / "nextgpt_projectors.safetensors").is_file() and "stage 3" in (out / "README.md").read_text()


def test_cli_refuses_bad_arguments_with_the_name_at_fault(tmp_path, capsys):
    assert main(["to_hf", "bundle=x"]) == 2 and "missing out=" in capsys.readouterr().err
    assert main(["from_legacy", f"checkpoint={tmp_path / 'nope.pt'}", f"out={tmp_path / 'b'}"]) == 2
    assert "nope.pt: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["from_legacy", f"checkpoint={bad}", f"out={tmp_path / 'b'}"]) == 2
    assert "bad.pt could not be read" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2 and "usage:" in capsys.readouterr().err


def test_a_stage2_checkpoint_without_lora_or_moved_rows(original, tmp_path):
    """Stages 1-2 of the original froze the LLM: no peft prefix, no LoRA; old rows as the base LLM's."""
    import json

    from transformers import AutoModelForCausalLM

    V = original["base_vocab"]
    ckpt = {}
    for k, v in original["ckpt"].items():
        if ".lora_" in k:
            continue
        k = k.replace("llama_model.base_model.model.", "llama_model.")
        ckpt[k] = v.clone()
    from nextgpt.config import compose

    cfg = compose(["experiment=nextgpt_legacy", *original["overrides"]], output_dir=str(tmp_path))
    base = AutoModelForCausalLM.from_pretrained(cfg.model.llm.path, dtype=torch.float32)
    ckpt["llama_model.model.embed_tokens.weight"][:V] = base.get_input_embeddings().weight[:V].detach()
    ckpt["llama_model.lm_head.weight"][:V] = base.get_output_embeddings().weight[:V].detach()
    ckpt = {k: v.half() if k.startswith("gen_text_hidden_fcs") else v for k, v in ckpt.items()}  # mixed dtypes
    path = tmp_path / "stage2.pt"
    torch.save(ckpt, path)
    bundle = import_legacy(path, tmp_path / "b2", original["overrides"])
    report = json.loads((bundle / "import_report.json").read_text())
    assert json.loads((bundle / "meta.json").read_text())["stage"] == 2
    assert not report["old_vocabulary_rows"]["kept"] and not (bundle / "base_rows.safetensors").exists()
    back = torch.load(export_legacy(bundle, tmp_path / "back.pt"), weights_only=True)
    assert list(back) == list(ckpt) and all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in ckpt.items())


@pytest.mark.parametrize("ckpt,needles", [
    ({}, ["empty.pt", "empty state dict"]),
    ({"encoder.layer.0.weight": torch.zeros(2, 2), "classifier.bias": torch.zeros(2)},
     ["foreign.pt", "none of its 2 keys", "encoder.layer.0.weight", "classifier.bias", "original NExT-GPT's layout"]),
], ids=("empty", "foreign"))
def test_cli_refuses_a_checkpoint_that_is_not_the_originals(ckpt, needles, tmp_path, capsys):
    path = tmp_path / ("empty.pt" if not ckpt else "foreign.pt")
    torch.save(ckpt, path)
    out = tmp_path / "bundle"
    assert main(["from_legacy", f"checkpoint={path}", f"out={out}", "model=tiny", f"paths.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err
    assert not out.exists()


def test_cli_names_a_missing_backbone_folder_before_building(tiny_cache, tmp_path, capsys):
    path = tmp_path / "pytorch_model.pt"
    torch.save({"llama_proj.weight": torch.zeros(2, 2)}, path)  # the original's layout: reaches the model config
    out = tmp_path / "bundle"
    code = main(["from_legacy", f"checkpoint={path}", f"out={out}", "model=tiny", f"paths.root={tmp_path}",
                 f"paths.cache_dir={tiny_cache}", f"model.llm.path={tmp_path / 'nonexistent'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"model.llm.path='{tmp_path / 'nonexistent'}'" in err and "does not exist" in err, err
    assert "Repo id" not in err and not out.exists()
