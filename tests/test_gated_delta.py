"""chunked == recurrent for the gated delta rule, including tiny decays, and both == the reference."""

import pytest
import torch
import torch.nn.functional as F

from qwen35.ops.gated_delta import chunk_gated_delta_rule, gated_delta_rule, recurrent_gated_delta_rule


def make_inputs(T, B=1, H=3, Dk=16, Dv=12, seed=0, tiny_decays=False):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, Dk, generator=gen), dim=-1) * Dk**-0.5
    k = F.normalize(torch.randn(B, T, H, Dk, generator=gen), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=gen)
    g = -torch.rand(B, T, H, generator=gen) * 1.5
    if tiny_decays:
        # decay factors exp(g) down to exp(-1e4) = 0 and exp(-80) ~ 1e-35, mixed with normal ones
        g[:, ::5] = -1e4
        g[:, 2::7] = -80.0
    beta = torch.rand(B, T, H, generator=gen)
    s0 = torch.randn(B, H, Dk, Dv, generator=gen) * 0.5
    return q, k, v, g, beta, s0


def recurrent_prefix_states(q, k, v, g, beta, s0):
    """Outputs of the whole sequence and the state after every prefix length, token by token."""
    states, outs, S = [], [], s0
    for t in range(q.shape[1]):
        o, S = recurrent_gated_delta_rule(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1],
                                          beta[:, t : t + 1], S)
        outs.append(o)
        states.append(S)
    return torch.cat(outs, 1), states


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("tiny", [False, True])
def test_chunked_equals_recurrent_for_every_length_up_to_300(with_state, tiny):
    q, k, v, g, beta, s0 = make_inputs(300, seed=int(with_state) + 2 * int(tiny), tiny_decays=tiny)
    if not with_state:
        s0 = torch.zeros_like(s0)
    ref_out, ref_states = recurrent_prefix_states(q, k, v, g, beta, s0)
    for T in range(1, 301):
        out, S = chunk_gated_delta_rule(q[:, :T], k[:, :T], v[:, :T], g[:, :T], beta[:, :T],
                                        s0 if with_state else None)
        assert torch.isfinite(out).all() and torch.isfinite(S).all()
        err = max((out - ref_out[:, :T]).abs().max().item(), (S - ref_states[T - 1]).abs().max().item())
        assert err <= 1e-5, (T, err)


def test_recurrent_matches_transformers_reference():
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    q, k, v, g, beta, s0 = make_inputs(40, B=2)
    ours, S = recurrent_gated_delta_rule(q, k, v, g, beta, s0)
    # the reference normalises and scales q itself; hand it the unscaled query
    ref, S_ref = torch_recurrent_gated_delta_rule(q * 16**0.5, k, v, g, beta, initial_state=s0,
                                                  output_final_state=True)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (S - S_ref).abs().max().item() <= 1e-5


def test_inputs_are_not_modified_and_dispatcher_modes_agree():
    q, k, v, g, beta, s0 = make_inputs(70, B=2)
    s0_copy = s0.clone()
    a, Sa = gated_delta_rule(q, k, v, g, beta, s0, mode="recurrent")
    b, Sb = gated_delta_rule(q, k, v, g, beta, s0, mode="chunk")
    c, Sc = gated_delta_rule(q, k, v, g, beta, s0)
    assert torch.equal(s0, s0_copy)
    assert (a - b).abs().max() <= 1e-5 and torch.equal(b, c) and torch.equal(Sb, Sc)
    with pytest.raises(ValueError, match="unknown gated delta rule mode 'fast'"):
        gated_delta_rule(q, k, v, g, beta, s0, mode="fast")


def test_chunked_form_has_gradients_matching_recurrent():
    q, k, v, g, beta, s0 = make_inputs(70, B=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, beta, s0)]
    grads = []
    for fn in (chunk_gated_delta_rule, recurrent_gated_delta_rule):
        for t in leaves:
            t.grad = None
        o, S = fn(*leaves)
        (o.square().sum() + S.square().sum()).backward()
        grads.append([t.grad.clone() for t in leaves])
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-4
