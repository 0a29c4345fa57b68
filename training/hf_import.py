"""Import a Hugging Face GPT-2 checkpoint from a local directory as a "gpt" artifact.

The directory is what `save_pretrained` writes (or a hub snapshot of a GPT-2 repository):
- config.json: a `gpt2` model; its hyperparameters map onto `GPTConfig`, and anything our GPT does not implement
  is refused rather than silently served with different math;
- model.safetensors (or model.safetensors.index.json and its shards): the weights. Never pickle: a directory
  with only pytorch_model.bin is refused. GPT-2's Conv1D layers store their weights (in, out), so c_attn, c_proj
  and c_fc are transposed for nn.Linear; the causal-mask buffers (attn.bias, attn.masked_bias) are skipped;
- tokenizer.json: GPT-2's byte-level BPE, loaded as our "bpe" tokenizer.

Nothing is downloaded. Every problem is a ValueError or FileNotFoundError naming the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from genserve.artifacts import artifact as art
from genserve.artifacts.tokenizer import TextTokenizer
from genserve.models.gpt import GPT, GPTConfig

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HF_TOKENIZER = "tokenizer.json"
GPT2_EOS = 50256  # <|endoftext|>, GPT-2's BOS and EOS
ONNX_LIMIT = 2**31 - 2**26  # protobuf's 2 GB per serialised model, less room for the graph itself

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# transformers' GPT2Config defaults, for keys a config.json leaves out.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False,
    "tie_word_embeddings": True, "bos_token_id": GPT2_EOS, "eos_token_id": GPT2_EOS,
}
CONV1D = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e})") from None


def _int(path: Path, raw: dict[str, Any], key: str, minimum: int = 1) -> int:
    value = raw.get(key, DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{path}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _token_id(path: Path, raw: dict[str, Any], key: str, vocab_size: int) -> int | None:
    value = raw.get(key, DEFAULTS[key])
    if value is None and key == "eos_token_id":
        return None  # generation then runs to its length limit
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, list):
        raise ValueError(f"{path}: {key} lists {len(value)} tokens; only one is supported")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{path}: {key} {value!r} is not a token id of the vocabulary of {vocab_size}")
    return value


def gpt_config_from_hf(raw: Any, path: Path = Path(CONFIG)) -> GPTConfig:
    """Our GPTConfig for a Hugging Face GPT-2 config.json; ValueError for anything our GPT does not implement."""
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type != "gpt2":
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; only 'gpt2' can be imported")
    n_embd, n_head = _int(path, raw, "n_embd"), _int(path, raw, "n_head")
    if n_embd % n_head:
        raise ValueError(f"{path}: n_embd {n_embd} is not divisible by n_head {n_head}")
    n_inner = raw.get("n_inner", DEFAULTS["n_inner"])
    if n_inner is not None and n_inner != 4 * n_embd:
        raise ValueError(f"{path}: n_inner {n_inner!r} is not supported (the MLP must be 4 x n_embd = {4 * n_embd})")
    unsupported = {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True,
                   "add_cross_attention": True, "scale_attn_weights": False}
    for key, bad in unsupported.items():
        if bool(raw.get(key, DEFAULTS[key])) == bad:
            raise ValueError(f"{path}: {key}={bad} is not supported")
    activation = raw.get("activation_function", DEFAULTS["activation_function"])
    if activation not in ACTIVATIONS:
        raise ValueError(f"{path}: activation_function {activation!r} is not supported "
                         f"(supported: {', '.join(ACTIVATIONS)})")
    eps = raw.get("layer_norm_epsilon", DEFAULTS["layer_norm_epsilon"])
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{path}: layer_norm_epsilon must be a positive number, got {eps!r}")
    return GPTConfig(vocab_size=_int(path, raw, "vocab_size", 2), context_length=_int(path, raw, "n_positions", 2),
                     n_layer=_int(path, raw, "n_layer"), n_head=n_head, n_embd=n_embd, dropout=0.0, bias=True,
                     activation=ACTIVATIONS[activation], layer_norm_eps=float(eps))


def _safetensors_files(directory: Path) -> list[Path]:
    single, index = directory / SAFETENSORS, directory / SAFETENSORS_INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        raw = _read_json(index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: has no weight_map")
        shards = sorted(set(weight_map.values()))
        bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s]
        if bad:
            raise ValueError(f"{index}: shard names must be plain file names, got {bad[:3]}")
        return [directory / s for s in shards]
    pickled = [name for name in PICKLED if (directory / name).is_file()]
    if pickled:
        raise ValueError(f"{directory / pickled[0]}: pickled weights are not loaded (they can run code); "
                         f"safetensors is required: save the model with save_pretrained(..., safe_serialization=True)")
    raise FileNotFoundError(f"{single}: missing (safetensors weights are required)")


def _read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Every tensor of the checkpoint, by its name without a "transformer." prefix, and the file it came from."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, Path] = {}
    for path in _safetensors_files(directory):
        try:
            loaded = load_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
        for key, tensor in loaded.items():
            name = key.removeprefix("transformer.")
            if name in tensors:
                raise ValueError(f"{path}: tensor {name!r} appears twice (with and without 'transformer.')")
            tensors[name], sources[name] = tensor, path
    return tensors, sources


def load_hf_weights(model: GPT, directory: Path, tied: bool = True) -> None:
    """Copy a GPT-2 checkpoint's weights into our GPT (transposing Conv1D); ValueError naming the file on any
    missing, unexpected or misshapen tensor."""
    tensors, sources = _read_tensors(directory)
    where = ", ".join(sorted({p.name for p in sources.values()})) or SAFETENSORS
    state = model.state_dict()
    wanted = {k for k in state if k != "lm_head.weight"}  # tied to wte
    new_state: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in tensors.items():
        if MASK_BUFFER.match(name):
            continue
        if name == "lm_head.weight":
            wte = tensors.get("wte.weight")
            if not tied and (wte is None or wte.shape != tensor.shape or not torch.equal(wte, tensor)):
                raise ValueError(f"{sources[name]}: lm_head.weight differs from wte.weight and the config does "
                                 "not tie them; untied output embeddings are not supported")
            continue
        if name not in wanted:
            unexpected.append(name)
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"{sources[name]}: {name} has dtype {tensor.dtype}, expected floating point")
        conv1d = bool(CONV1D.match(name))
        expected = tuple(state[name].shape)[:: -1 if conv1d else 1]  # Conv1D stores (in, out)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{sources[name]}: {name} has shape {tuple(tensor.shape)}, config.json needs {expected}")
        new_state[name] = (tensor.t() if conv1d else tensor).to(torch.float32)
    if not tied and "lm_head.weight" not in tensors:
        raise ValueError(f"{directory / where}: config.json does not tie the output embedding to wte, and there is "
                         "no lm_head.weight; untied output embeddings are not supported")
    missing = sorted(wanted - set(new_state))
    if missing or unexpected:
        raise ValueError(f"{directory / where}: does not fit config.json (missing {missing[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    with torch.no_grad():
        for name, tensor in new_state.items():
            state[name].copy_(tensor)


def load_hf_tokenizer(directory: Path, config: GPTConfig, bos: int, eos: int | None) -> TextTokenizer:
    path = directory / HF_TOKENIZER
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (vocab.json and merges.txt alone are not read; save the "
                                "tokenizer with a fast tokenizer's save_pretrained to get tokenizer.json)") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e})") from None
    try:
        tokenizer = TextTokenizer.from_json(data, "bpe", bos, eos)
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ValueError(f"{path}: not a byte-level BPE tokenizer that fits config.json ({e})") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{path}: {tokenizer.vocab_size} tokens, more than the model's vocab_size "
                         f"{config.vocab_size} in {CONFIG}")
    return tokenizer


def import_hf_gpt2(directory: Path, name: str, store: Path, export_onnx: bool = True) -> Path:
    """Read a local Hugging Face GPT-2 directory and write it as a new version of `name` in `store`; returns the
    artifact's path."""
    directory = Path(directory)
    art.validate_name(name)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    config_path = directory / CONFIG
    raw = _read_json(config_path)
    config = gpt_config_from_hf(raw, config_path)
    bos = _token_id(config_path, raw, "bos_token_id", config.vocab_size)
    assert bos is not None
    eos = _token_id(config_path, raw, "eos_token_id", config.vocab_size)
    tokenizer = load_hf_tokenizer(directory, config, bos, eos)
    model = GPT(config)
    load_hf_weights(model, directory, tied=bool(raw.get("tie_word_embeddings", DEFAULTS["tie_word_embeddings"])))
    model.eval()
    files = {art.WEIGHTS: art.module_weights(model), art.TOKENIZER: tokenizer.to_json().encode("utf-8")}
    metrics: dict[str, Any] = {"parameters": model.num_parameters()}
    if export_onnx and 4 * metrics["parameters"] > ONNX_LIMIT:
        raise ValueError(f"{config_path}: {metrics['parameters']:,} parameters do not fit a single-file ONNX graph "
                         "(2 GB); import without ONNX (--no-onnx) and serve with the torch runtime")
    if export_onnx:
        from genserve.training.onnx_export import check_gpt_onnx, export_gpt_onnx

        files[art.ONNX_PREFILL], files[art.ONNX_DECODE] = export_gpt_onnx(model)
        metrics["onnx_max_rel_error"] = check_gpt_onnx(model, files[art.ONNX_PREFILL], files[art.ONNX_DECODE],
                                                       atol=1e-3)
    spec = art.TextInputSpec(tokenizer="bpe", vocab_size=config.vocab_size, context_length=config.context_length,
                             bos_token_id=bos, eos_token_id=eos)
    training = {"source": "huggingface", "directory": str(directory.resolve()), "config": raw}
    return art.write_artifact(store, kind="gpt", name=name, config=config.to_dict(), input_spec=spec,
                              training=training, metrics=metrics, files=files)
