"""Write the UMT5 parity fixture: a tiny random transformers `UMT5EncoderModel`, a tiny T5-style tokenizer,
and their outputs for a few prompts, under tests/fixtures/umt5_tiny/.

Runs in its own environment with torch (CPU), transformers, diffusers and sentencepiece, which the library
itself never needs:

    python3.11 -m venv ~/parity-venv
    ~/parity-venv/bin/pip install torch transformers diffusers sentencepiece protobuf tokenizers
    ~/parity-venv/bin/python scripts/make_umt5_fixture.py

It writes
  tokenizer/             tokenizer.json, tokenizer_config.json, special_tokens_map.json: a SentencePiece
                         Unigram model trained on a few sentences, converted as transformers converts T5's
                         (pad 0, </s> 1, <unk> 2, extra ids last, a small precompiled normalisation map);
  text_encoder/          UMT5EncoderModel.save_pretrained: config.json + model.safetensors;
  text_encoder_sharded/  the same weights in shards with model.safetensors.index.json;
  io.safetensors         metadata: the prompts, diffusers' prompt_clean of each, max_length; tensors, all
                         from transformers and diffusers:
    input_ids, attention_mask   int32 [batch, max_length]: AutoTokenizer on prompt_clean(prompts), as
                                WanPipeline calls it (one prompt longer than max_length);
    last_hidden_state           float32 [batch, max_length, d_model]: the encoder on that padded batch;
    last_hidden_state_bf16      the same from the encoder loaded in bfloat16, as float32;
    prompt_embeds               float32 [batch, max_length, d_model]: WanPipeline._get_t5_prompt_embeds;
    buckets_<name>              int32 [1201]: transformers' relative-position bucket of offsets -600..600
                                for the tiny config and for umt5-xxl's (32 buckets, max distance 128).

Every parameter is random, norm scales and position-bias tables included, and num_heads * d_kv differs from
d_model, so a transposed projection, a shared bias table or a misplaced mask cannot pass tests/test_umt5.py.
"""

import argparse
import json
import shutil
import tempfile
import types
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from diffusers.pipelines.wan.pipeline_wan import WanPipeline, prompt_clean
from safetensors.numpy import save_file
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel
from transformers.convert_slow_tokenizer import T5Converter
from transformers.models.umt5.modeling_umt5 import UMT5Attention

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "umt5_tiny"
EXTRA_IDS = 4
MAX_LENGTH = 32

# SentencePiece training text: English, French, German and Chinese (Wan's default negative prompt is Chinese).
SENTENCES = [
  "A cat walks on the grass, realistic style.",
  "A dog runs along the beach at sunset, cinematic lighting.",
  "Two astronauts float inside a space station, slow motion.",
  "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量",
  "Un chat noir dort sur le canapé près de la fenêtre.",
  "Ein Hund spielt im Schnee mit einem roten Ball.",
  "The quick brown fox jumps over the lazy dog.",
  "A bird flies over the mountains in the morning fog.",
]
# A small normalisation map (SentencePiece rule TSV: source code points, target code points) so that the
# tokenizer has a Precompiled normaliser, as umt5's has: the fi ligature, full-width A and a, ideographic space.
NORMALIZATION_RULES = "FB01\t66 69\nFF21\t41\nFF41\t61\n3000\t20\n"

PROMPTS = [
  "A cat walks on the grass, realistic style.",
  "  Tom &amp;amp; Jerry\n\tchase\u3000each other\x1f &lt;3 ",
  "色调艳丽，过曝，静态",
  "ﬁne Ａrt of a dog <extra_id_1> at sunset",
  "The quick brown fox jumps over the lazy dog while two astronauts float inside a space station.",
  "A.",
]

MODEL = dict(
  vocab_size=None,  # the tokenizer's size plus a few unused rows, as umt5-xxl's table is larger than its vocabulary
  d_model=32,
  d_kv=6,
  num_heads=4,
  d_ff=48,
  num_layers=3,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=16,
  feed_forward_proj="gated-gelu",
  layer_norm_epsilon=1e-6,
)
XXL_BUCKETS = dict(relative_attention_num_buckets=32, relative_attention_max_distance=128)


def write_tokenizer(folder: Path) -> None:
  """Train a tiny SentencePiece Unigram model and convert it as transformers' T5Converter converts T5's."""
  with tempfile.TemporaryDirectory() as tmp:
    rules = Path(tmp) / "rules.tsv"
    rules.write_text(NORMALIZATION_RULES)
    model_path = Path(tmp) / "spiece.model"
    with open(model_path, "wb") as model_file:
      sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20),
        model_writer=model_file,
        model_type="unigram",
        vocab_size=150,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        normalization_rule_tsv=str(rules),
        num_threads=1,
        minloglevel=2,
      )

    # T5Converter reads these attributes of the slow tokenizer it converts.
    original = types.SimpleNamespace(
      vocab_file=str(model_path), _extra_ids=EXTRA_IDS, legacy=True, convert_tokens_to_ids=lambda token: 1
    )
    tokenizer = T5Converter(original).converted()
  extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
  tokenizer.add_special_tokens(["<pad>", "</s>", "<unk>", *extra])
  folder.mkdir(parents=True)
  tokenizer.save(str(folder / "tokenizer.json"))
  special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}
  (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
  config = {"tokenizer_class": "T5Tokenizer", "extra_ids": EXTRA_IDS, "model_max_length": 512, **special}
  (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def tokenize(folder: Path):
  """AutoTokenizer as WanPipeline calls it, checked against PreTrainedTokenizerFast on tokenizer.json."""
  auto = AutoTokenizer.from_pretrained(folder)
  fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="<pad>", eos_token="</s>")
  kwargs = dict(padding="max_length", max_length=MAX_LENGTH, truncation=True, add_special_tokens=True)
  cleaned = [prompt_clean(p) for p in PROMPTS]
  tokens = auto(cleaned, return_attention_mask=True, return_tensors="np", **kwargs)
  check = fast(cleaned, return_attention_mask=True, return_tensors="np", **kwargs)
  assert (tokens.input_ids == check.input_ids).all() and (tokens.attention_mask == check.attention_mask).all()
  lengths = tokens.attention_mask.sum(1)
  assert lengths.max() == MAX_LENGTH and lengths.min() < MAX_LENGTH // 2, lengths  # truncation and padding
  return auto, tokens.input_ids.astype(np.int32), tokens.attention_mask.astype(np.int32)


@torch.no_grad()
def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
  """Every parameter random: matrices scaled by fan-in, norm scales around 1, embedding and bias tables N(0, 1)."""
  for name, param in model.named_parameters():
    noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
    if name.endswith("layer_norm.weight"):
      value = 1.0 + 0.3 * noise
    elif "relative_attention_bias" in name or name == "shared.weight":
      value = noise
    else:
      value = noise / param.shape[1] ** 0.5
    param.copy_(value.to(param.dtype))


def buckets(**fields) -> np.ndarray:
  config = UMT5Config(d_model=8, d_kv=2, num_heads=1, **fields)
  attention = UMT5Attention(config, has_relative_attention_bias=True)
  return attention._relative_position_bucket(torch.arange(-600, 601)).numpy().astype(np.int32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=OUT)
  args = parser.parse_args()
  shutil.rmtree(args.out, ignore_errors=True)
  write_tokenizer(args.out / "tokenizer")
  tokenizer, input_ids, attention_mask = tokenize(args.out / "tokenizer")

  torch.manual_seed(0)
  config = UMT5Config(**{**MODEL, "vocab_size": len(tokenizer) + 5})
  model = UMT5EncoderModel(config).eval()
  randomize(model, torch.Generator().manual_seed(1))
  model.save_pretrained(args.out / "text_encoder")
  model.save_pretrained(args.out / "text_encoder_sharded", max_shard_size="40KB")
  assert (args.out / "text_encoder_sharded" / "model.safetensors.index.json").is_file()

  with torch.no_grad():
    hidden = model(torch.from_numpy(input_ids).long(), torch.from_numpy(attention_mask).long()).last_hidden_state
    pipeline = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=model, _execution_device=torch.device("cpu"))
    embeds = WanPipeline._get_t5_prompt_embeds(pipeline, PROMPTS, max_sequence_length=MAX_LENGTH)
    reloaded = UMT5EncoderModel.from_pretrained(args.out / "text_encoder_sharded").eval()
    again = reloaded(torch.from_numpy(input_ids).long(), torch.from_numpy(attention_mask).long()).last_hidden_state
    half = UMT5EncoderModel.from_pretrained(args.out / "text_encoder", dtype=torch.bfloat16).eval()
    hidden_bf16 = half(torch.from_numpy(input_ids).long(), torch.from_numpy(attention_mask).long()).last_hidden_state
  assert torch.equal(hidden, again)

  tensors = {
    "input_ids": input_ids,
    "attention_mask": attention_mask,
    "last_hidden_state": hidden.numpy().astype(np.float32),
    "last_hidden_state_bf16": hidden_bf16.float().numpy(),
    "prompt_embeds": embeds.numpy().astype(np.float32),
    "buckets_tiny": buckets(**{k: MODEL[k] for k in XXL_BUCKETS}),
    "buckets_xxl": buckets(**XXL_BUCKETS),
  }
  metadata = {
    "prompts": json.dumps(PROMPTS, ensure_ascii=False),
    "cleaned": json.dumps([prompt_clean(p) for p in PROMPTS], ensure_ascii=False),
    "max_length": str(MAX_LENGTH),
  }
  save_file(tensors, args.out / "io.safetensors", metadata=metadata)
  sizes = {p.relative_to(args.out): p.stat().st_size for p in sorted(args.out.rglob("*")) if p.is_file()}
  for path, size in sizes.items():
    print(f"{size:>8}  {path}")
  print(f"lengths {attention_mask.sum(1).tolist()} of max_length {MAX_LENGTH}, vocab {config.vocab_size}")


if __name__ == "__main__":
  main()
