"""``TinyLM.generate``: greedy decoding unchanged, and sampling (temperature, top-k, top-p) against an independent
reference of the filtered distribution: the exact probabilities handed to the sampler, the empirical distribution of
one step, and decoding through the caches against teacher forcing."""

from __future__ import annotations

import math

import pytest
import torch

from nearfar import TinyLM
from nearfar.models import filter_logits

VOCAB = 12


def _lm(mechanism: str = "streaming_llm", seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    if mechanism == "streaming_llm":  # a window shorter than the sequences: the caches roll
        kw = {"window": 4, "sinks": 1, **kw}
    lm = TinyLM(VOCAB, dim=32, depth=2, num_heads=2, mechanism=mechanism, **kw).eval()
    with torch.no_grad():  # sharper logits than the 0.02-std initialisation gives: samples differ from greedy
        lm.embed.weight.mul_(7)
    return lm


def _prompt(batch: int = 3, length: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """The sampling distribution of one row of logits, in float64 with plain Python: divide by the temperature;
    keep the tokens whose logit is >= the k-th largest; then, in order of probability, keep tokens while the mass
    of those kept before is below top_p (the first always); softmax over what is kept."""
    z = [float(v) / temperature for v in logits.double()]
    keep = set(range(len(z)))
    if top_k is not None:
        kth = sorted(z, reverse=True)[min(top_k, len(z)) - 1]
        keep = {i for i in keep if z[i] >= kth}
    if top_p is not None:
        total = sum(math.exp(z[i]) for i in keep)
        mass, nucleus = 0.0, set()
        for i in sorted(keep, key=lambda i: -z[i]):
            if mass < top_p or not nucleus:
                nucleus.add(i)
                mass += math.exp(z[i]) / total
        keep = nucleus
    total = sum(math.exp(z[i]) for i in keep)
    return torch.tensor([math.exp(z[i]) / total if i in keep else 0.0 for i in range(len(z))], dtype=torch.float64)


def _old_greedy(lm: TinyLM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """``generate`` as it was before sampling: argmax through the caches."""
    caches = lm.new_caches(prompt.shape[0])
    with torch.no_grad():
        logits = lm(prompt, caches)
        out = [prompt]
        for _ in range(n):
            nxt = logits[:, -1:].argmax(-1)
            out.append(nxt)
            logits = lm(nxt, caches)
    return torch.cat(out, 1)


@pytest.mark.parametrize("mechanism", ["streaming_llm", "dense"])
def test_greedy_is_unchanged_and_is_teacher_forced_argmax(mechanism):
    lm, prompt = _lm(mechanism), _prompt()
    out = lm.generate(prompt, 8)
    assert torch.equal(out, _old_greedy(lm, prompt, 8))
    with torch.no_grad():
        logits = lm(out[:, :-1])
    assert torch.equal(out[:, 4:], logits[:, 3:].argmax(-1))


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    lm, prompt = _lm(), _prompt()
    greedy = lm.generate(prompt, 8)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(lm.generate(prompt, 8, do_sample=True, top_k=1, generator=g), greedy)
        assert torch.equal(lm.generate(prompt, 8, do_sample=True, top_p=1e-9, temperature=2.0, generator=g), greedy)
    # and plain sampling is not greedy here (so the two checks above can fail)
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(lm.generate(prompt, 8, do_sample=True, temperature=3.0, generator=g), greedy)


def test_a_seeded_generator_reproduces_the_samples():
    lm, prompt = _lm(), _prompt()
    kw = dict(do_sample=True, temperature=1.5, top_k=8, top_p=0.95)
    first = lm.generate(prompt, 10, generator=torch.Generator().manual_seed(5), **kw)
    again = lm.generate(prompt, 10, generator=torch.Generator().manual_seed(5), **kw)
    other = lm.generate(prompt, 10, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(first, again) and not torch.equal(first, other)
    torch.manual_seed(7)  # without a generator: torch's global stream
    a = lm.generate(prompt, 10, **kw)
    torch.manual_seed(7)
    assert torch.equal(a, lm.generate(prompt, 10, **kw))


def _capture(monkeypatch) -> list[torch.Tensor]:
    """Record every distribution ``generate`` hands to ``torch.multinomial``."""
    seen, real = [], torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.detach().clone())
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    return seen


SETTINGS = [dict(temperature=0.7), dict(top_k=3), dict(top_p=0.6), dict(temperature=1.3, top_k=5, top_p=0.8),
            dict(temperature=0.5, top_k=20, top_p=1.0)]


@pytest.mark.parametrize("kw", SETTINGS)
def test_the_sampled_distribution_is_the_filtered_softmax(kw, monkeypatch):
    lm, prompt = _lm(), _prompt()
    seen = _capture(monkeypatch)
    lm.generate(prompt, 1, do_sample=True, generator=torch.Generator().manual_seed(0), **kw)
    with torch.no_grad():
        last = lm(prompt)[:, -1]
    (probs,) = seen
    want = torch.stack([reference_probs(row, **kw) for row in last])
    torch.testing.assert_close(probs.double(), want, atol=1e-6, rtol=1e-5)
    assert filter_logits(last, **kw).shape == last.shape


def test_the_empirical_distribution_of_one_step_matches(monkeypatch):
    """20,000 draws of one step: Pearson's chi-square against the filtered softmax stays below its 99.9% quantile,
    no filtered token is ever drawn, and the unfiltered softmax is rejected by the same test (it has the power)."""
    lm = _lm()
    kw = dict(temperature=0.9, top_k=6, top_p=0.9)
    prompt = _prompt(1).expand(20_000, -1)
    out = lm.generate(prompt, 1, do_sample=True, generator=torch.Generator().manual_seed(0), **kw)
    counts = torch.bincount(out[:, -1], minlength=VOCAB).double()
    with torch.no_grad():
        last = lm(prompt[:1])[0, -1]
    want = reference_probs(last, **kw)
    kept = want > 0
    assert 2 <= int(kept.sum()) <= 6 and counts[~kept].sum() == 0

    def chi2(p):
        expected = p[kept] * counts.sum()
        return float(((counts[kept] - expected) ** 2 / expected).sum())

    # 99.9% quantiles of chi-square with 1..5 degrees of freedom
    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}[int(kept.sum()) - 1]
    assert chi2(want) < critical
    assert chi2(reference_probs(last)) > critical  # the unfiltered distribution is told apart


def test_decoding_through_the_caches_samples_from_the_teacher_forced_distributions(monkeypatch):
    lm, prompt = _lm(), _prompt(2, 3)
    kw = dict(temperature=1.2, top_k=7, top_p=0.85)
    seen = _capture(monkeypatch)
    out = lm.generate(prompt, 9, do_sample=True, generator=torch.Generator().manual_seed(3), **kw)
    assert len(seen) == 9 and not torch.equal(out, lm.generate(prompt, 9))
    with torch.no_grad():
        logits = lm(out[:, :-1])  # teacher forcing over the sampled sequence
    for step, probs in enumerate(seen):
        want = torch.stack([reference_probs(row, **kw) for row in logits[:, 2 + step]])
        torch.testing.assert_close(probs.double(), want, atol=1e-5, rtol=1e-4)
        assert (probs.gather(1, out[:, 3 + step, None]) > 0).all()  # every draw is a kept token


@pytest.mark.parametrize("kw,error,match", [
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
    (dict(do_sample=True, temperature=float("nan")), ValueError, "temperature"),
    (dict(do_sample=True, temperature="hot"), TypeError, "temperature"),
    (dict(do_sample=True, top_k=0), ValueError, "top_k"),
    (dict(do_sample=True, top_k=2.5), TypeError, "top_k"),
    (dict(do_sample=True, top_k=True), TypeError, "top_k"),
    (dict(do_sample=True, top_p=0.0), ValueError, r"top_p must be a number in \(0, 1\]"),
    (dict(do_sample=True, top_p=1.5), ValueError, "top_p"),
    (dict(do_sample=True, generator=3), TypeError, "generator"),
    (dict(do_sample="yes"), TypeError, "do_sample"),
    (dict(temperature=0.7), ValueError, "do_sample=True"),
    (dict(top_k=5), ValueError, "top_k only apply to sampling"),
    (dict(generator=torch.Generator()), ValueError, "generator"),
])
def test_bad_arguments_raise_clear_errors(kw, error, match):
    lm = _lm()
    with pytest.raises(error, match=match):
        lm.generate(_prompt(), 2, **kw)


def test_max_new_tokens_is_checked():
    with pytest.raises(ValueError, match="max_new_tokens"):
        _lm().generate(_prompt(), -1)
    assert torch.equal(_lm().generate(_prompt(), 0), _prompt())
