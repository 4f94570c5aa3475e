"""Weights in and out: the original's delta checkpoint imports into a bundle that computes what the
original computed, goes back bit for bit, and exports to a Hugging Face folder.

The checkpoint is made at tiny size by the original's own procedure, never written by hand:
``OriginalNextGPT`` composes the model as ``anyToImageVideoAudio.py`` does (the LLaMA frozen, or
wrapped by peft's ``get_peft_model`` in stage 3; the tokenizer extended and the matrices resized;
``llama_proj``; ``gen_text_hidden_fcs{,_video,_audio}`` of ``TextFcLayer``), its trainable
tensors are moved as training moves them, and ``save_model`` keeps what ``agent.py:save_model``
keeps: ``named_parameters()`` that require grad, plus the projectors by name. So the keys carry
peft's adapter name (``...q_proj.lora_A.default.weight``) exactly as the release does.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from nextgpt.convert.__main__ import export_legacy, export_to_hf, import_legacy, load_bundle_model, main
from nextgpt.convert.legacy import legacy_tokens
from nextgpt.model import build_nextgpt
from nextgpt.model_spec import ModelSpec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class TextFcLayer(nn.Module):
    """The original's output projector (``mode='transformer'``), as it is written there."""

    def __init__(self, in_dim, out_dim, num_output_tokens, d_model, nhead, n_enc, n_dec, ff):
        super().__init__()
        self.fc = nn.Linear(in_dim, d_model)
        self.tfm = nn.Transformer(
            batch_first=True,
            norm_first=True,
            d_model=d_model,
            num_encoder_layers=n_enc,
            num_decoder_layers=n_dec,
            dim_feedforward=ff,
            dropout=0.0,
            nhead=nhead,
        )
        self.model = nn.Linear(d_model, out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, num_output_tokens, d_model))

    def forward(self, x, input_embs):
        x = self.fc(x + input_embs)
        return self.model(self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1)))


PREFIX = {
    "image": "gen_text_hidden_fcs",
    "video": "gen_text_hidden_fcs_video",
    "audio": "gen_text_hidden_fcs_audio",
}


class OriginalNextGPT(nn.Module):
    """``NextGPTModel.__init__`` of the original, in its order, at the sizes of ``model_cfg``."""

    def __init__(self, model_cfg: dict, ours, tokenizer, names: list[str], *, freeze_lm: bool):
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import AutoModelForCausalLM

        super().__init__()
        self.llama_model = AutoModelForCausalLM.from_pretrained(model_cfg["llm"]["path"], dtype=torch.float32)
        if freeze_lm:  # stages 1-2
            for p in self.llama_model.parameters():
                p.requires_grad = False
        else:  # stage 3: peft's LoRA on q/k/v/o
            lora = model_cfg["lora"]
            self.llama_model = get_peft_model(
                self.llama_model,
                LoraConfig(
                    task_type=TaskType.CAUSAL_LM,
                    inference_mode=False,
                    r=lora["r"],
                    lora_alpha=lora["alpha"],
                    lora_dropout=0.0,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                ),
            )
        tokenizer.add_tokens(names)  # _add_image_token / _add_video_token / _add_audio_token
        self.llama_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        # transformers 4.29 (the original's pin) resized into new modules, which require grad whatever the
        # old ones did; since transformers#26865 (4.35) they keep the old flag. Do what 4.29 did:
        self.llama_model.get_input_embeddings().weight.requires_grad_(True)
        self.llama_model.get_output_embeddings().weight.requires_grad_(True)
        hidden = self.llama_model.config.hidden_size
        self.llama_proj = nn.Linear(ours.encoder.embed_dim, hidden)
        op = model_cfg["output_projector"]
        for m, prefix in PREFIX.items():
            p = ours.output_projectors[m]
            setattr(
                self,
                prefix,
                nn.ModuleList(
                    [
                        TextFcLayer(
                            hidden,
                            p.out_fc.out_features,
                            p.queries.shape[0],
                            op["d_model"],
                            op["nhead"],
                            op["num_encoder_layers"],
                            op["num_decoder_layers"],
                            op["dim_feedforward"],
                        )
                    ]
                ),
            )

    @torch.no_grad()
    def train_a_little(self, base_vocab: int) -> None:
        """Move every trainable tensor as training does: the new rows and, a little, the old ones (the
        original trained whole matrices), the adapters (peft starts lora_B at zero), the projectors."""
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if n.endswith("embed_tokens.weight") or n.endswith("lm_head.weight"):
                p[base_vocab:] = torch.randn_like(p[base_vocab:]) * 0.05
                p[:base_vocab] += torch.randn_like(p[:base_vocab]) * 1e-3
            elif ".lora_B." in n:
                p.normal_(0, 0.05)

    def save_model(self) -> dict[str, torch.Tensor]:
        """``agent.py:save_model``: what requires grad, and the projectors by name."""
        ckpt = OrderedDict()
        for k, v in self.named_parameters():
            if v.requires_grad or "gen_text_hidden_fcs" in k or "llama_proj" in k:
                ckpt[k] = v.detach().clone()
        return ckpt


def make_original(tiny_cache, tmp, *, freeze_lm: bool) -> dict:
    from transformers import AutoTokenizer

    from nextgpt.config import compose

    overrides = ["model=tiny", f"paths.root={tmp}", f"paths.cache_dir={tiny_cache}"]
    cfg = compose(
        ["experiment=nextgpt_legacy", f"stage={2 if freeze_lm else 3}", *overrides], output_dir=str(tmp)
    )
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    ours, _, _ = build_nextgpt(ModelSpec.from_config(model_cfg))  # only for the shapes and the base LLM
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_cfg["llm"]["path"])
    base_vocab = len(tokenizer)
    names = legacy_tokens({m: int(v["num_signal_tokens"]) for m, v in model_cfg["modalities"].items()})
    model = OriginalNextGPT(model_cfg, ours, tokenizer, names, freeze_lm=freeze_lm).eval()
    model.train_a_little(base_vocab)
    ckpt = model.save_model()
    path = tmp / "pytorch_model.pt"
    torch.save(ckpt, path)
    return {
        "path": path,
        "ckpt": ckpt,
        "model": model,
        "llama": model.llama_model,
        "llama_proj": model.llama_proj,
        "fcs": {m: getattr(model, p)[0] for m, p in PREFIX.items()},
        "tokenizer": tokenizer,
        "base_vocab": base_vocab,
        "names": names,
        "overrides": overrides,
        "tmp": tmp,
    }


@pytest.fixture(scope="module")
def original(tiny_cache, tmp_path_factory):
    """The original's stage-3 checkpoint (LoRA), its model, and the overrides that compose ours."""
    return make_original(tiny_cache, tmp_path_factory.mktemp("legacy"), freeze_lm=False)


def test_the_original_procedure_saves_what_the_release_holds(original):
    """The layout of the released stage-3 delta: peft's adapter name on every LoRA tensor, the whole
    resized matrices under peft's prefix, the projectors; nothing of the frozen LLaMA besides."""
    keys = list(original["ckpt"])
    lora = [k for k in keys if ".lora_" in k]
    assert lora and all(
        k.startswith("llama_model.base_model.model.model.layers.")
        and (k.endswith(".lora_A.default.weight") or k.endswith(".lora_B.default.weight"))
        for k in lora
    )
    assert {
        "llama_model.base_model.model.model.embed_tokens.weight",
        "llama_model.base_model.model.lm_head.weight",
        "llama_proj.weight",
        "gen_text_hidden_fcs_audio.0.query_embs",
    } <= set(keys)
    assert (
        len(lora) == 2 * 4 * original["llama"].config.num_hidden_layers
    )  # A and B of q/k/v/o in every layer
    assert not [k for k in keys if "norm" in k and "tfm" not in k]


@pytest.fixture(scope="module")
def bundle(original):
    return import_legacy(original["path"], original["tmp"] / "imported", original["overrides"])


def test_import_reports_every_key_and_keeps_moved_old_rows(original, bundle):
    import json

    report = json.loads((bundle / "import_report.json").read_text())
    assert set(report["mapped"]) == set(original["ckpt"]) and report["skipped"] == {}
    rows = report["old_vocabulary_rows"]
    assert (
        rows["kept"]
        and rows["embed_rows_changed"] == original["base_vocab"]
        and rows["embed_max_abs_change"] > 0
    )
    assert (bundle / "base_rows.safetensors").is_file()


def test_imported_bundle_computes_what_the_original_computed(original, bundle):
    model, tokenizer, _, _ = load_bundle_model(bundle)
    o = original
    V, names = o["base_vocab"], o["names"]
    legacy_id = {t: V + j for j, t in enumerate(names)}
    our_id = dict(
        zip(
            tokenizer.convert_ids_to_tokens(list(range(V, len(tokenizer)))),
            range(V, len(tokenizer)),
            strict=False,
        )
    )
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
        got = model(
            ours_ids,
            media_mask=media_mask,
            media_features={"image": feature},
            media_sequence=[("image", 0, True)],
            every_modality=False,
        )
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
    assert tok.convert_tokens_to_ids(["[IMG0]", "<Img>"]) == tokenizer.convert_tokens_to_ids(
        ["[IMG0]", "<Img>"]
    )
    ids = torch.tensor(
        [
            tokenizer(
                "### Human: a red circle\n### Assistant: [IMG0][IMG1][IMG2][IMG3]", add_special_tokens=True
            )["input_ids"]
        ]
    )
    with torch.no_grad():
        want = model(ids, every_modality=False).logits
        got = merged(ids).logits
    V = model.layout.first_new_id
    print(
        f"merged vs unmerged logits: max |diff| {float((got - want).abs().max()):.2e} (logit scale "
        f"{float(want.abs().max()):.2f})"
    )
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


def test_a_stage2_checkpoint_without_lora_or_moved_rows(tiny_cache, tmp_path):
    """Stages 1-2 of the original froze the LLM: no peft prefix, no LoRA. Here its old rows are put
    back to the base LLM's (as if they had not moved) and the projectors saved in fp16: the bundle
    keeps no base rows and gives back every key in its own dtype."""
    import json

    from transformers import AutoModelForCausalLM

    o = make_original(tiny_cache, tmp_path, freeze_lm=True)
    ckpt, V = dict(o["ckpt"]), o["base_vocab"]
    assert not [k for k in ckpt if ".lora_" in k or "base_model" in k]
    assert {"llama_model.model.embed_tokens.weight", "llama_model.lm_head.weight"} <= set(ckpt)
    base = AutoModelForCausalLM.from_pretrained(o["llama"].name_or_path, dtype=torch.float32)
    ckpt["llama_model.model.embed_tokens.weight"][:V] = base.get_input_embeddings().weight[:V].detach()
    ckpt["llama_model.lm_head.weight"][:V] = base.get_output_embeddings().weight[:V].detach()
    ckpt = {
        k: v.half() if k.startswith("gen_text_hidden_fcs") else v for k, v in ckpt.items()
    }  # mixed dtypes
    path = tmp_path / "stage2.pt"
    torch.save(ckpt, path)
    kept = import_legacy(
        path, tmp_path / "all", o["overrides"]
    )  # experiment=nextgpt_legacy: model.vocab_rows=all
    assert json.loads((kept / "import_report.json").read_text())["old_vocabulary_rows"]["kept"]
    assert (kept / "base_rows.safetensors").is_file()  # trained weights there, moved or not
    bundle = import_legacy(path, tmp_path / "b2", [*o["overrides"], "model.vocab_rows=new"])
    report = json.loads((bundle / "import_report.json").read_text())
    assert json.loads((bundle / "meta.json").read_text())["stage"] == 2
    assert not report["old_vocabulary_rows"]["kept"] and not (bundle / "base_rows.safetensors").exists()
    back = torch.load(export_legacy(bundle, tmp_path / "back.pt"), weights_only=True)
    assert list(back) == list(ckpt) and all(
        back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in ckpt.items()
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact_in_half_precision(original, dtype, tmp_path):
    """The release is saved from an fp16 DeepSpeed engine; bf16 is today's default: either comes back
    bit for bit through the fp32 bundle."""
    ckpt = {k: v.to(dtype) for k, v in original["ckpt"].items()}
    path = tmp_path / "half.pt"
    torch.save(ckpt, path)
    bundle = import_legacy(path, tmp_path / "b", original["overrides"])
    back = torch.load(export_legacy(bundle, tmp_path / "back.pt"), weights_only=True)
    assert list(back) == list(ckpt)
    for k, v in ckpt.items():
        assert back[k].dtype == dtype and torch.equal(back[k], v), k


def test_an_unused_key_stops_the_import_by_name_unless_allowed(original, tmp_path, capsys):
    import json

    ckpt = dict(original["ckpt"])
    extra = "llama_model.base_model.model.model.norm.weight"
    ckpt[extra] = torch.ones(original["llama"].config.hidden_size)
    path = tmp_path / "extra.pt"
    torch.save(ckpt, path)
    out = tmp_path / "b"
    args = ["from_legacy", f"checkpoint={path}", f"out={out}", *original["overrides"]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert extra in err and "1 of its" in err and "--allow-unused" in err and not out.exists(), err
    assert main([*args, "--allow-unused"]) == 0
    report = json.loads((out / "import_report.json").read_text())
    assert list(report["skipped"]) == [extra] and set(report["mapped"]) == set(original["ckpt"])
    assert "1 skipped under --allow-unused" in capsys.readouterr().out


def test_the_adapter_less_lora_layout_of_older_peft_imports_and_goes_back_as_it_came(original, tmp_path):
    ckpt = {k.replace(".default.weight", ".weight"): v for k, v in original["ckpt"].items()}
    path = tmp_path / "old_peft.pt"
    torch.save(ckpt, path)
    bundle = import_legacy(path, tmp_path / "b", original["overrides"])
    back = torch.load(export_legacy(bundle, tmp_path / "back.pt"), weights_only=True)
    assert list(back) == list(ckpt) and all(torch.equal(back[k], v) for k, v in ckpt.items())


def test_a_bundle_trained_here_exports_in_the_releases_layout(original, bundle, tmp_path):
    """Without the import's key list (a bundle trained by this project), ``to_legacy`` writes what the
    original's ``save_model`` writes: the same keys, peft's adapter names included."""
    import json

    from nextgpt.convert.legacy import to_legacy

    model, _, _, _ = load_bundle_model(bundle)
    fresh = to_legacy(model)
    assert set(fresh) == set(original["ckpt"])
    assert all(torch.equal(fresh[k], v) for k, v in original["ckpt"].items())
    assert json.loads((bundle / "meta.json").read_text())["legacy_import"]["keys"] == list(original["ckpt"])


@pytest.mark.parametrize(
    "ckpt,needles",
    [
        ({}, ["empty.pt", "empty state dict"]),
        (
            {"encoder.layer.0.weight": torch.zeros(2, 2), "classifier.bias": torch.zeros(2)},
            [
                "foreign.pt",
                "none of its 2 keys",
                "encoder.layer.0.weight",
                "classifier.bias",
                "original NExT-GPT's layout",
            ],
        ),
    ],
    ids=("empty", "foreign"),
)
def test_cli_refuses_a_checkpoint_that_is_not_the_originals(ckpt, needles, tmp_path, capsys):
    path = tmp_path / ("empty.pt" if not ckpt else "foreign.pt")
    torch.save(ckpt, path)
    out = tmp_path / "bundle"
    assert (
        main(["from_legacy", f"checkpoint={path}", f"out={out}", "model=tiny", f"paths.root={tmp_path}"]) == 2
    )
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err
    assert not out.exists()


def test_cli_names_a_missing_backbone_folder_before_building(tiny_cache, tmp_path, capsys):
    path = tmp_path / "pytorch_model.pt"
    torch.save(
        {"llama_proj.weight": torch.zeros(2, 2)}, path
    )  # the original's layout: reaches the model config
    out = tmp_path / "bundle"
    code = main(
        [
            "from_legacy",
            f"checkpoint={path}",
            f"out={out}",
            "model=tiny",
            f"paths.root={tmp_path}",
            f"paths.cache_dir={tiny_cache}",
            f"model.llm.path={tmp_path / 'nonexistent'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"model.llm.path='{tmp_path / 'nonexistent'}'" in err and "does not exist" in err, (
        err
    )
    assert "Repo id" not in err and not out.exists()


def test_a_half_precision_release_into_a_bf16_llm_comes_back_bit_for_bit(original, tmp_path):
    """The 7B config loads the LLM in bf16 while the release was saved from an fp16 engine: the
    export takes the kept rows from the bundle, not from the bf16 matrices, and loses no bit."""
    ckpt = {k: v.half() for k, v in original["ckpt"].items()}
    path = tmp_path / "fp16.pt"
    torch.save(ckpt, path)
    bundle = import_legacy(path, tmp_path / "b", [*original["overrides"], "model.llm.dtype=bfloat16"])
    back = torch.load(export_legacy(bundle, tmp_path / "back.pt"), weights_only=True)
    lost = [k for k, v in ckpt.items() if back[k].dtype != v.dtype or not torch.equal(back[k], v)]
    assert not lost, lost[:5]
