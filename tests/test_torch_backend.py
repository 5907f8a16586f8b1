"""The `torch` reference backend against the float64 oracle over random shapes (>= 200 each)."""
import pytest

from kit import attention_cases, check_attention_case, check_lora_case, lora_cases

N_CASES = 210


@pytest.mark.parametrize("i", range(N_CASES))
def test_window_attention(i):
    c = attention_cases("window_attention", "torch", 1, seed=1000 + i)[0]
    check_attention_case("window_attention", "torch", c, seed=i)


@pytest.mark.parametrize("i", range(N_CASES))
def test_cross_attention(i):
    c = attention_cases("cross_attention", "torch", 1, seed=2000 + i)[0]
    check_attention_case("cross_attention", "torch", c, seed=i)


@pytest.mark.parametrize("i", range(N_CASES))
def test_lora_linear(i):
    c = lora_cases("torch", 1, seed=3000 + i)[0]
    check_lora_case("torch", c, seed=i)
