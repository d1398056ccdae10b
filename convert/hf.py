"""Hugging Face GPT-2 (GPT2LMHeadModel safetensors) ↔ our model.

In:  a folder (config.json + model.safetensors, or a sharded model.safetensors.index.json), a lone
     .safetensors file, or a Hub repo id fetched with huggingface_hub (its cache, HF_HUB_OFFLINE
     and HF_ENDPOINT apply). Keys with or without the `transformer.` prefix; mask buffers
     (`attn.bias`, `attn.masked_bias`) ignored; the c_proj Conv1D weights transposed to [out, in];
     an `lm_head.weight` that differs from `wte` kept as an untied head.
Out: `export_hf` writes a standard GPT2LMHeadModel folder (config.json with model_type "gpt2",
     tie_word_embeddings=false and its own lm_head.weight when our head is untied,
     model.safetensors in save_pretrained's layout, generation_config.json, tokenizer files) that
     transformers loads with no code of ours.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gpt2_scratch.convert.build import model_from_state
from gpt2_scratch.convert.errors import ConvertError
from gpt2_scratch.convert.mapping import HF_IGNORED, HF_RULES, HF_TIED_HEAD, Dims, convert_tensors, plan_conversion, strip_hf_prefix
from gpt2_scratch.core.download import DownloadError, hub_resolves
from gpt2_scratch.core.files import path_kind, write_dir_atomically
from gpt2_scratch.tokenizer import check_tokenizer_files

log = logging.getLogger(__name__)

# Head counts of the four released widths: the one hyperparameter a weights file cannot reveal.
N_HEAD_OF_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}
# GPT-2's tanh-approximated GELU under its transformers names.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# ---------------------------------------------------------------------------------------------
# Reading safetensors lazily: shapes first (for the checks), tensors one at a time
# ---------------------------------------------------------------------------------------------
class SafetensorsReader:
    """Names, shapes and tensors of one model.safetensors or of all shards listed in an index."""

    def __init__(self, files: list[Path], label: str):
        self.label = label
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._handles = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ConvertError(f"{f}: not a readable safetensors file ({e})") from None
            self._handles[f] = handle
            for name in handle.keys():
                self._where[name] = f
                self._shapes[name] = tuple(handle.get_slice(name).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)


def _weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ConvertError(f"{index}: not a safetensors index ({e})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ConvertError(f"{index}: shard {missing[0]} listed but not found in {folder}")
        return [folder / s for s in shards]
    if (folder / "pytorch_model.bin").is_file():
        raise ConvertError(f"{folder}: only pytorch_model.bin (a pickle) found; we load safetensors only, "
                           "which never runs code from the file: convert it with transformers' save_pretrained")
    raise ConvertError(f"{folder}: no model.safetensors (or model.safetensors.index.json) found")


def _dims_from_config(path: Path) -> tuple[Dims, float]:
    from gpt2_scratch.model_dir import read_config_file

    cfg = read_config_file(path, ConvertError)  # a JSON object, or one line naming the file
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise ConvertError(f"{path}: model_type {cfg.get('model_type')!r} is not GPT-2; `convert hf` reads "
                           "GPT2LMHeadModel checkpoints (our own model folders load with from_pretrained)")
    act = cfg.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise ConvertError(f"{path}: activation_function {act!r} differs from GPT-2's tanh GELU (gelu_new); "
                           "our model cannot reproduce it")
    unsupported = {"scale_attn_by_inverse_layer_idx": True, "scale_attn_weights": False, "add_cross_attention": True}
    for key, bad in unsupported.items():
        if cfg.get(key) is bad:
            raise ConvertError(f"{path}: {key}={bad} is a GPT-2 variant our model does not implement")
    n_embd = cfg.get("n_embd", cfg.get("hidden_size"))
    if cfg.get("n_inner") is not None and isinstance(n_embd, int) and cfg["n_inner"] != 4 * n_embd:
        raise ConvertError(f"{path}: n_inner={cfg['n_inner']} but our MLP is 4 × n_embd = {4 * n_embd}")
    hp = {"n_vocab": cfg.get("vocab_size"), "n_ctx": cfg.get("n_positions", cfg.get("n_ctx")),
          "n_embd": n_embd, "n_head": cfg.get("n_head"), "n_layer": cfg.get("n_layer")}
    hp = {k: v for k, v in hp.items() if v is not None}
    return Dims.from_hparams(hp, str(path)), float(cfg.get("layer_norm_epsilon", 1e-5))


def _dims_from_shapes(shapes: dict[str, tuple[int, ...]], source: str) -> Dims:
    """For a lone .safetensors file: sizes from the tensors, heads from the released widths."""
    try:
        n_vocab, n_embd = shapes["wte.weight"]
        n_ctx, _ = shapes["wpe.weight"]
    except (KeyError, ValueError):
        raise ConvertError(f"{source}: no 'wte.weight'/'wpe.weight' tensors; not a GPT-2 checkpoint") from None
    layers = {int(m.group(1)) for n in shapes if (m := re.match(r"^h\.(\d+)\.", n))}
    if not layers:
        raise ConvertError(f"{source}: no transformer blocks (h.N.*) found; not a GPT-2 checkpoint")
    if n_embd not in N_HEAD_OF_WIDTH:
        raise ConvertError(f"{source}: width {n_embd} is not one of GPT-2's released sizes, so the number of "
                           "heads is unknown; put the model's config.json next to the file")
    return Dims(n_vocab=n_vocab, n_ctx=n_ctx, n_embd=n_embd, n_head=N_HEAD_OF_WIDTH[n_embd],
                n_layer=max(layers) + 1)


def load_hf_checkpoint(path: str | Path):
    """Read, check and convert a GPT2LMHeadModel folder or .safetensors file; returns our model."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConvertError(f"{path}: expected a folder or a .safetensors file")
        files, config_path = [path], path.parent / "config.json"
    elif path.is_dir():
        check_tokenizer_files(path, flag="--from-dir")  # another tokenizer: refused, not ignored
        files, config_path = _weight_files(path), path / "config.json"
    elif path_kind(path) is not None:  # /dev/null, a named pipe, a link loop
        raise ConvertError(f"{path} is {path_kind(path)}; pass a model folder or a .safetensors file")
    else:
        raise ConvertError(f"{path}: no such file or folder")
    label = str(files[0]) if len(files) == 1 else str(path / "model.safetensors.index.json")
    reader = SafetensorsReader(files, label)
    in_file = reader.shapes()
    by_short = strip_hf_prefix(in_file, label)  # {"h.0.ln_1.weight": name in file}
    shapes = {short: in_file[name] for short, name in by_short.items()}
    if config_path.is_file():
        dims, eps = _dims_from_config(config_path)
        dims_source = str(config_path)
    else:
        dims, eps = _dims_from_shapes(shapes, label), 1e-5
        dims_source = f"{label} (no config.json: sizes read from the tensors)"
        log.warning("%s: no config.json; assuming a standard GPT-2 (%s)", label, dims.describe())

    plan = plan_conversion(shapes, HF_RULES, dims, source=label, dims_source=dims_source,
                           ignore=lambda n: bool(HF_IGNORED.match(n)) or n == HF_TIED_HEAD)
    state = convert_tensors(plan, lambda short: reader.read(by_short[short]))
    if HF_TIED_HEAD in by_short:
        # A saved head equal to wte is GPT-2's tied head; a different one stays untied (model_from_state
        # decides, as transformers itself does when a file holds both).
        head = reader.read(by_short[HF_TIED_HEAD])
        if tuple(head.shape) != (dims.n_vocab, dims.n_embd):
            raise ConvertError(f"{label}: tensor '{by_short[HF_TIED_HEAD]}' has shape {list(head.shape)} but "
                               f"{dims_source} ({dims.describe()}) implies {[dims.n_vocab, dims.n_embd]}")
        state[HF_TIED_HEAD] = head
    elif config_path.is_file() and _config_unties(config_path):
        raise ConvertError(f"{label}: missing tensor '{HF_TIED_HEAD}' although {config_path} says "
                           "tie_word_embeddings=false; the untied head's weights are not in the file")
    model = model_from_state(dims, state, source=label, layer_norm_epsilon=eps)
    style = _prompt_style(config_path) if config_path.is_file() else None
    if style is not None:  # an instruction model exported by us: it keeps the style it was trained with
        model.config.prompt_style = style
    return model


def _prompt_style(path: Path) -> str | None:
    """The ``prompt_style`` a GPT-2 config.json records (``export_hf`` writes it), checked; None when absent."""
    from gpt2_scratch.core.prompts import PROMPT_STYLES
    from gpt2_scratch.model_dir import read_config_file

    style = read_config_file(path, ConvertError).get("prompt_style")
    if style is not None and style not in PROMPT_STYLES:
        raise ConvertError(f"{path}: prompt_style {style!r} is none of {', '.join(PROMPT_STYLES)}; fix config.json")
    return style


def _config_unties(path: Path) -> bool:
    from gpt2_scratch.model_dir import read_config_file

    return read_config_file(path, ConvertError).get("tie_word_embeddings", True) is False


# ---------------------------------------------------------------------------------------------
# The Hub
# ---------------------------------------------------------------------------------------------
def fetch_hf_repo(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the cache) a repo's config.json and safetensors; returns the snapshot folder.

    huggingface_hub's `hf_hub_download` does the work, file by file, so its cache, HF_HOME,
    HF_HUB_OFFLINE, HF_ENDPOINT and HF_TOKEN all apply. Failures become one line naming the repo
    and offering --from-dir.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{constants.ENDPOINT}/{repo_id}"
    # Without a resolvable Hub host, huggingface_hub would retry each file for ~25 s, logging every
    # attempt: look in its cache only, and say why below.
    unreachable = not constants.HF_HUB_OFFLINE and not hub_resolves(constants.ENDPOINT)

    def get(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=unreachable))

    try:
        config = get("config.json")
        try:
            get("model.safetensors")
        except (RemoteEntryNotFoundError, LocalEntryNotFoundError) as single_missing:
            # Large models are sharded: model.safetensors.index.json names the shards.
            try:
                index = get("model.safetensors.index.json")
            except (RemoteEntryNotFoundError, LocalEntryNotFoundError):
                raise single_missing from None
            for shard in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())):
                get(shard)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ConvertError(f"{where}: repository not found or not accessible ({type(e).__name__}); check the "
                           "repo id, or log in with `hf auth login` for a private one") from None
    except RevisionNotFoundError:
        raise ConvertError(f"{where}: revision {revision!r} not found") from None
    except RemoteEntryNotFoundError as e:
        raise ConvertError(f"{where}: has no {_missing_name(e)}; only GPT-2 safetensors checkpoints are "
                           "converted") from None
    except LocalEntryNotFoundError:
        offline = (" (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE
                   else " (its host name does not resolve: offline?)" if unreachable else "")
        raise DownloadError(f"cannot download {repo_id} from {constants.ENDPOINT} and it is not in the Hugging Face "
                            f"cache{offline}; copy its folder here and use `gpt2-scratch convert hf --from-dir PATH`",
                            url=where, reason="not cached", offline=True) from None
    except (HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DownloadError(f"{where}: download failed ({first}); retry, or use `gpt2-scratch convert hf --from-dir PATH`",
                            url=where, reason=first) from None
    return config.parent


def _missing_name(e: Exception) -> str:
    m = re.search(r"/resolve/[^/]+/(\S+?)['\s]", str(e) + " ")
    return m.group(1) if m else "model.safetensors"


# ---------------------------------------------------------------------------------------------
# Export: our model folder → standard GPT2LMHeadModel folder
# ---------------------------------------------------------------------------------------------
def export_hf(model_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write `model_dir` (ours) as a transformers GPT2LMHeadModel folder at `out_dir`, atomically."""
    from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

    from gpt2_scratch import GPT2ScratchConfig, get_tokenizer
    from gpt2_scratch.core.prompts import chat_template
    from gpt2_scratch.model_dir import read_config_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        what = f"is {path_kind(model_dir)}, not a folder" if path_kind(model_dir) else "no config.json"
        raise ConvertError(f"{model_dir}: {what}; pass a model folder written by gpt2-scratch")
    check_tokenizer_files(model_dir)  # another tokenizer would be exported as if it were GPT-2's
    model_type = read_config_file(model_dir / "config.json", ConvertError).get("model_type")  # a list: one line
    if model_type == "gpt2":
        raise ConvertError(f"{model_dir}: already a transformers GPT-2 folder (model_type gpt2), which is what "
                           "export-hf writes; use it as it is, or copy it")
    if model_type != "gpt2-scratch":
        raise ConvertError(f"{model_dir}: holds a {model_type!r} model, not a gpt2-scratch one; pass a model folder "
                           "written by gpt2-scratch")
    cfg = GPT2ScratchConfig.from_pretrained(model_dir)
    reader = SafetensorsReader(_weight_files(model_dir), str(model_dir))
    names = set(reader.shapes())
    if "score.weight" in names:
        raise ConvertError(f"{model_dir}: holds a sequence classifier (score.weight); export-hf writes causal LMs")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConvertError(f"{out_dir}: already exists and is not empty; choose another --out")

    dims = Dims(n_vocab=cfg.vocab_size, n_ctx=cfg.context_length, n_embd=cfg.emb_dim, n_head=cfg.n_heads,
                n_layer=cfg.n_layers)
    # Our names are transformers' with the c_proj weights transposed, so exporting runs HF_RULES backwards.
    ours_to_hf = {}
    for rule in HF_RULES:
        for i in range(dims.n_layer) if "{i}" in rule.source else [None]:
            ours = rule.target.format(i=i)
            ours_to_hf[ours] = ("transformer." + rule.source.format(i=i), rule.layout)
    state: dict[str, torch.Tensor] = {}
    for ours, (hf_name, layout) in ours_to_hf.items():
        if ours in names:
            t = reader.read(ours).float()
            state[hf_name] = t.T.contiguous() if layout == "transpose" else t.contiguous()
        elif ours.endswith("attn.c_attn.bias") and not cfg.qkv_bias:
            state[hf_name] = torch.zeros(3 * dims.n_embd)  # GPT-2 always has the bias; zeros = none
        else:
            raise ConvertError(f"{model_dir}: missing tensor '{ours}' in the model's safetensors")
    extra = names - set(ours_to_hf) - {"lm_head.weight"}
    if extra:
        raise ConvertError(f"{model_dir}: unknown tensor '{sorted(extra)[0]}' has no GPT-2 counterpart")
    # Untied exactly when our head differs from wte (as from_pretrained loads it); GPT2LMHeadModel
    # expresses that with tie_word_embeddings=False and its own lm_head.weight.
    head = reader.read("lm_head.weight").float() if "lm_head.weight" in names else None
    if head is None and not cfg.tie_word_embeddings:
        raise ConvertError(f"{model_dir}: missing tensor 'lm_head.weight' although config.json says "
                           "tie_word_embeddings=false")
    tied = head is None or torch.equal(head, state["transformer.wte.weight"])
    style = getattr(cfg, "prompt_style", None)

    hf_config = GPT2Config(
        vocab_size=dims.n_vocab, n_positions=dims.n_ctx, n_embd=dims.n_embd, n_layer=dims.n_layer,
        n_head=dims.n_head, layer_norm_epsilon=cfg.layer_norm_epsilon, activation_function="gelu_new",
        resid_pdrop=cfg.drop_rate, embd_pdrop=cfg.drop_rate, attn_pdrop=cfg.drop_rate,
        bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=tied,
        architectures=["GPT2LMHeadModel"],
        # The prompt style travels with the weights (`chat`, `respond` and `convert hf` read it back).
        **({"prompt_style": style} if style else {}),
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        tokenizer = get_tokenizer()
    # The model's context, not GPT-2's 1024 (folders written before save_model_dir said so may carry 1024).
    tokenizer.model_max_length = dims.n_ctx
    if style:
        tokenizer.chat_template = chat_template(style)

    # transformers' own class writes the folder, so its layout is whatever transformers expects. Built
    # on the meta device and handed our tensors, it costs no second copy of the model.
    with torch.device("meta"):
        hf_model = GPT2LMHeadModel(hf_config)
    hf_model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"] if tied else head},
                             strict=True, assign=True)
    hf_model.tie_weights()
    hf_model.generation_config = GenerationConfig(bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)

    def write(tmp: Path) -> None:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_dir_atomically(out_dir, write, overwrite=overwrite)
