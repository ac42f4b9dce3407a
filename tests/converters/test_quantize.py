"""llama.cpp's quantizer: SmolLM2 in q8_0 and q4_k_m still answers; every export type loads."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest
from forge.converters import ConversionError, convert_hf_to_gguf
from forge.converters.quantize import quantize_gguf

from .tiny_models import read_back

# type -> (GGML type most weights get, llama.cpp's file type) for rows of 256 (k-quant blocks fit)
EXPORT_TYPES = {
    "q4_k_m": ("Q4_K", 15),
    "q5_k_m": ("Q5_K", 17),
    "q6_k": ("Q6_K", 18),
    "q8_0": ("Q8_0", 7),
    "q4_0": ("Q4_0", 2),
    "f16": ("F16", 1),
    "bf16": ("BF16", 32),
}


def chat(gguf_path: Path, question: str) -> tuple[str, str]:
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=512, n_threads=2, verbose=False)
    try:
        reply = llm.create_chat_completion([{"role": "user", "content": question}], temperature=0.0, max_tokens=48)
    finally:
        llm.close()
    choice = reply["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m"])
def test_quantized_smollm2_answers_a_chat_prompt(qtype: str, smollm2_quantized) -> None:
    path = smollm2_quantized[qtype].path
    colors, colors_end = chat(path, "Name three colors.")
    total, total_end = chat(path, "What is 2 + 2?")
    # greedy, stopped by the model's own end-of-turn token (template, EOS and EOT all work)
    assert (colors_end, total_end) == ("stop", "stop"), (colors, total)
    assert sum(c in colors.lower() for c in ("red", "blue", "green", "yellow")) >= 2, colors
    assert "4" in total, total


@pytest.mark.slow
def test_quantize_results_record_type_size_bits_and_time(smollm2_f16, smollm2_quantized) -> None:
    q8, q4 = smollm2_quantized["q8_0"], smollm2_quantized["q4_k_m"]
    for result in (q8, q4):
        assert result.size_bytes == result.path.stat().st_size
        assert result.seconds > 0
        fields, tensors = read_back(result.path)
        assert fields["general.file_type"] == {"q8_0": 7, "q4_k_m": 15}[result.qtype]
        assert len(tensors) == smollm2_f16.tensor_count
    assert 8.0 < q8.bits_per_weight < 9.0  # q8_0 is 8.5 bits per weight, plus f32 norms
    # SmolLM2's 576-wide rows do not fit 256-blocks: llama.cpp falls back to q5_0/q8_0 for most tensors
    assert 4.5 < q4.bits_per_weight < q8.bits_per_weight
    assert q4.size_bytes < q8.size_bytes < smollm2_f16.size_bytes
    assert q8.to_dict()["qtype"] == "q8_0"


@pytest.mark.slow
def test_every_export_type_quantizes_and_loads(tiny_model, tmp_path: Path) -> None:
    f16 = convert_hf_to_gguf(tiny_model("llama", wide=True), tmp_path / "source-f16.gguf")
    sizes = {}
    for qtype, (main_type, file_type) in EXPORT_TYPES.items():
        result = quantize_gguf(f16.path, tmp_path / f"{qtype}.gguf", qtype, nthread=2)
        fields, _ = read_back(result.path)
        assert fields["general.file_type"] == file_type
        assert main_type in result.tensor_types, (qtype, result.tensor_types)
        llama_cpp.Llama(str(result.path), n_ctx=64, verbose=False).close()
        sizes[qtype] = result.size_bytes
    assert sizes["q4_0"] < sizes["q4_k_m"] < sizes["q5_k_m"] < sizes["q6_k"] < sizes["q8_0"] < sizes["f16"]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(["source-f16.gguf", *(f"{q}.gguf" for q in EXPORT_TYPES)])  # no partial files


def test_quantizing_a_quantized_file_is_refused(smollm2_quantized, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="already quantized; quantize from an f16/bf16/f32 GGUF"):
        quantize_gguf(smollm2_quantized["q8_0"].path, tmp_path / "again.gguf", "q4_k_m", nthread=2)
    assert list(tmp_path.iterdir()) == []


def test_unknown_type_and_missing_input_are_clear_errors(smollm2_f16, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="quant type 'q4_k_xl' is not supported; supported: .*q4_k_m"):
        quantize_gguf(smollm2_f16.path, tmp_path / "x.gguf", "q4_k_xl", nthread=2)
    with pytest.raises(ConversionError, match="missing.gguf: input GGUF not found"):
        quantize_gguf(tmp_path / "missing.gguf", tmp_path / "x.gguf", "q8_0", nthread=2)
