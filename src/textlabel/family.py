"""What differs between the model families textlabel trains and labels with, in one place.

- **Encoders** (BERT, RoBERTa, DistilBERT, DeBERTa-v2, ELECTRA, ModernBERT, ...) classify from their first
  token ([CLS] / <s>), through the pooler where the architecture has one; they ship a pad token.
- **Decoders** (GPT-2, Llama, Qwen, Mistral, ...) classify from the last real token, and their tokenizers
  usually have no pad token. We pad with the EOS token (the model never attends to padding, so which id
  fills it does not matter) and set ``config.pad_token_id`` to it, which is how Hugging Face's
  ``*ForSequenceClassification`` finds each row's last real token, in our jobs and in ``pipeline()``.
  The embedding matrix is never resized, so a LoRA adapter stays small and the artifact keeps the base
  model's vocabulary. Every batch pads on the right: with left padding, rotary and learned positions
  would shift by the padding and a row's label would depend on its batch.
- **Encoder-decoders** (T5, BART) are refused: their classifiers pool the decoder's EOS states, which this
  project does not build.

``check`` runs on the driver before Ray starts, so a model that cannot work fails in a second, with the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

# Models whose position ids start after the pad id (RoBERTa's padding_idx + 1): that many fewer usable positions.
_POSITION_OFFSET = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "roberta-prelayernorm",
                    "longformer", "ibert", "markuplm"}
# LoRA targets for families PEFT's own table leaves out (the attention's query and value projections).
_LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"], "modernbert": ["Wqkv"]}


class FamilyError(ValueError):
    """A model that cannot be trained or labelled as asked; the message names the fix."""


@dataclass(frozen=True)
class Family:
    """How textlabel handles one model: what it pools, how it pads, how long its inputs may be."""

    model_type: str
    decoder: bool  # classifies from the last real token; pads with EOS when it has no pad token
    positions: int | None  # longest input its position embeddings allow (None: relative positions only)

    @property
    def pooling(self) -> str:
        return "last token" if self.decoder else "first token"


def of(config) -> Family:
    """The family of a Hugging Face config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = config.model_type
    decoder = kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return Family(kind, decoder, _positions(config))


def _positions(config) -> int | None:
    if getattr(config, "position_biased_input", True) is False:  # DeBERTa-v2/v3: relative positions only
        return None
    found = getattr(config, "max_position_embeddings", None)
    if not isinstance(found, int):
        return None
    if config.model_type in _POSITION_OFFSET:
        found -= (config.pad_token_id or 0) + 1
    return found


def problems(config, max_length: int, model: str) -> list[str]:
    """Why ``config`` cannot be fine-tuned or used for labelling with inputs of ``max_length`` tokens, if it cannot."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        return [f"--model {model}: {kind} is an encoder-decoder model, which textlabel does not fine-tune; use an "
                "encoder (BERT, RoBERTa, DeBERTa, ModernBERT, ...) or a decoder (GPT-2, Llama, Qwen, ...)"]
    if kind not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return [f"--model {model}: transformers has no sequence-classification class for model type {kind!r}; use a "
                "text model with an AutoModelForSequenceClassification class (BERT, RoBERTa, GPT-2, ...)"]
    limit = of(config).positions
    if limit is not None and max_length > limit:
        return [f"--max-length {max_length} is beyond {model}'s {limit} positions; give --max-length {limit} or less "
                "(and --long-texts chunk to read longer texts in windows)"]
    return []


def fit_tokenizer(tokenizer, config):
    """The tokenizer as training and labelling use it: a pad token (EOS for a decoder without one), right padding.
    A decoder whose config names a pad id pads with that one: its classifier finds each row's last token by it."""
    named = config.pad_token_id
    if named is not None and 0 <= named < len(tokenizer) and (tokenizer.pad_token is None or
                                                             (of(config).decoder and tokenizer.pad_token_id != named)):
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(named)
    if tokenizer.pad_token is None:
        fill = tokenizer.eos_token or tokenizer.sep_token or tokenizer.unk_token
        if fill is None:
            raise FamilyError(f"the {config.model_type} tokenizer has no pad, EOS, SEP or UNK token to pad batches with; "
                              "give it a pad token (tokenizer.pad_token = ...) and save it with the model")
        tokenizer.pad_token = fill
    tokenizer.padding_side = "right"
    return tokenizer


def lora_targets(config) -> list[str]:
    """The modules LoRA adapts in a family by default: its attention's query and value projections."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    found = _LORA_TARGETS.get(config.model_type) or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(config.model_type)
    if not found:
        raise FamilyError(f"no default LoRA target modules for model type {config.model_type!r}; name them with "
                          "--lora-target-modules (the attention's projection layers, e.g. q_proj v_proj)")
    return list(found)
