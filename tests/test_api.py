"""refnet's public API: compare / assert_same / check_backward / trace_compare / check_training,
and bad input (each a clear message, never a broadcast, never a silent pass)."""
import pytest
import torch

import manual.activations as acts
import refnet
from refnet import examples
from refnet.compare import TOLERANCES, ULP_LIMIT


def test_all_is_exported_and_documented():
    assert refnet.__all__
    for name in refnet.__all__:
        obj = getattr(refnet, name)
        if callable(obj):
            assert obj.__doc__, f"refnet.{name} has no docstring"
    assert ">>>" in refnet.grads_of.__doc__


def test_compare_grades_each_tier():
    x = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    assert refnet.compare(x.clone(), x).tier == "bitwise"
    up = torch.nextafter(x, torch.full_like(x, 10))
    assert refnet.compare(up, x).tier == "ulp"
    assert refnet.compare(x * (1 + 1e-12), x).tier == "tolerance"
    v = refnet.compare(x + 1, x, name="dx")
    assert v.tier == "fail" and not v.passed and not v
    assert refnet.compare(up, x, tier="bitwise").passed is False
    assert refnet.compare(up, x, tier="ulp").passed is True


def test_a_failed_message_names_index_values_ulps_share_and_thresholds():
    exp = torch.zeros(4, 8)
    act = exp.clone()
    act[2, 5] = 1e-3
    with pytest.raises(AssertionError) as info:
        refnet.assert_same(act, exp, tier="ulp", name="dW1")
    text = str(info.value)
    for part in ("dW1 is 'fail'", "required 'ulp'", "1 of 32 elements differ", "(3.12%)",
                 "worst at index [2, 5]", "actual 0.0010", "vs expected 0.0", "max ulp",
                 "ulp <= 8", "tolerance |actual - expected| <= 0 + 0.0001*|expected|"):
        assert part in text, (part, text)


@pytest.mark.parametrize("actual, expected, words", [
    (torch.ones(64), torch.ones(1, 64), "shape [64] vs [1, 64]"),
    (torch.ones(3, 1), torch.ones(3), "shape [3, 1] vs [3]"),
    (torch.ones(3), torch.ones(3, dtype=torch.float64), "dtype torch.float32 vs torch.float64"),
    (torch.ones(3, dtype=torch.int64), torch.ones(3), "dtype torch.int64 vs torch.float32"),
])
def test_mismatches_fail_and_never_broadcast(actual, expected, words):
    v = refnet.compare(actual, expected, name="g")
    assert v.tier == "fail" and not v.passed
    assert words in v.note and "never broadcasts" in v.note
    with pytest.raises(AssertionError, match="never broadcasts"):
        refnet.assert_same(actual, expected, tier="tolerance")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_device_mismatch_fails():
    v = refnet.compare(torch.ones(3, device="cuda"), torch.ones(3))
    assert v.tier == "fail" and "device cuda:0 vs cpu" in v.note
    assert refnet.compare(torch.ones(3, device="cuda"), torch.ones(3, device="cuda")).tier == "bitwise"


def test_a_device_mismatch_fails_on_meta():
    # the meta device stands in for a second device on a CPU-only machine
    v = refnet.compare(torch.ones(3, device="meta"), torch.ones(3))
    assert v.tier == "fail" and "device meta vs cpu" in v.note


@pytest.mark.parametrize("bad, kind", [([1.0, 2.0], "list"), (3.0, "float"), (None, "NoneType")])
def test_non_tensors_are_a_type_error(bad, kind):
    with pytest.raises(TypeError, match=f"actual: expected a torch.Tensor .*got {kind}"):
        refnet.compare(bad, torch.ones(2))
    with pytest.raises(TypeError, match=f"expected: expected a torch.Tensor .*got {kind}"):
        refnet.assert_same(torch.ones(2), bad)


def test_nan_on_one_side_only_fails_and_says_so():
    a = torch.tensor([1.0, float("nan"), 3.0])
    b = torch.tensor([1.0, 2.0, 3.0])
    for x, y, where in ((a, b, "1 in actual, 0 in expected"), (b, a, "0 in actual, 1 in expected")):
        v = refnet.compare(x, y, name="g")
        assert v.tier == "fail" and "NaN on one side only: " + where in v.note
        assert v.worst_index == [1]
    both = refnet.compare(a.clone(), a)
    assert both.tier == "bitwise" and "NaN at the same positions" in both.note


def test_bad_tier_and_half_precision():
    with pytest.raises(ValueError, match="tier: expected one of bitwise, ulp, tolerance, got 'fail'"):
        refnet.assert_same(torch.ones(2), torch.ones(2), tier="fail")
    with pytest.raises(TypeError, match="float8_e4m3fn is not graded"):
        refnet.compare(torch.ones(2, dtype=torch.float8_e4m3fn),
                       torch.ones(2, dtype=torch.float8_e4m3fn))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_graded_in_its_own_ulps(dtype):
    """bfloat16 / float16 are graded natively: one step of the 16-bit pattern is 1 ulp, the
    ulp limit and tolerances are the dtype's own (refnet.compare.ULP_LIMIT / TOLERANCES)."""
    base = torch.tensor([1.0, -2.5, 3e-3, 0.0], dtype=dtype)
    assert refnet.compare(base.clone(), base).tier == "bitwise"
    near = base.clone()
    near[1] = (base.view(torch.int16)[1] + ULP_LIMIT[dtype]).view(dtype)   # k ulps further out
    v = refnet.compare(near, base)
    assert (v.tier, v.max_ulp, v.worst_index, v.dtype) == ("ulp", ULP_LIMIT[dtype], [1], str(dtype)[6:])
    tiny = torch.tensor([1], dtype=torch.int16).view(dtype)         # the smallest subnormal
    assert refnet.compare(-tiny, tiny).max_ulp == 2                # across zero: both sides
    rtol, _ = TOLERANCES[dtype]["grad"]
    far = base.clone()
    far[0] = 1.0 + 4 * rtol                                       # 4 rtol away: a failure
    assert refnet.compare(far, base).tier == "fail"


def test_integers_are_exact():
    assert refnet.compare(torch.arange(4), torch.arange(4)).tier == "bitwise"
    assert refnet.compare(torch.arange(4) + 1, torch.arange(4)).tier == "fail"


# --- check_backward ---------------------------------------------------------------------------
def affine(x, w, b):
    return x @ w + b


def affine_backward(dout, x, w, b):
    return dout @ w.T, x.T @ dout, dout.sum(0)


def affine_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 5, generator=g, dtype=dtype), torch.randn(5, 3, generator=g, dtype=dtype),
            torch.randn(3, generator=g, dtype=dtype)]


def test_check_backward_plain_shape_names_grads_after_the_arguments():
    report = refnet.check_backward(affine, affine_inputs(), affine_backward, tier="bitwise")
    assert [v.name for v in report] == ["dx", "dw", "db"] and report.passed and report
    assert report.forward.tier == "bitwise"
    assert "refnet.check_backward(affine): 3 checks" in str(report)


def test_check_backward_catches_a_wrong_gradient_with_the_worst_element():
    def wrong(dout, x, w, b):
        dx, dw, db = affine_backward(dout, x, w, b)
        return dx, dw * 1.5, db
    report = refnet.check_backward(affine, affine_inputs(), wrong)
    assert not report and report["dw"].tier == "fail" and report["dx"].passed
    with pytest.raises(AssertionError, match=r"dw is 'fail'(.|\n)*worst at index \[\d, \d\]"):
        report.assert_ok()


def test_backward_fn_returning_the_wrong_number_of_gradients():
    with pytest.raises(ValueError, match=r"backward_fn: returned 2 gradient\(s\), expected 3, one per "
                                         r"differentiated input in order: dx, dw, db"):
        refnet.check_backward(affine, affine_inputs(), lambda dout, x, w, b: (dout @ w.T, x.T @ dout))


def test_backward_fn_returning_a_wrong_shape_is_a_failed_verdict_not_a_broadcast():
    report = refnet.check_backward(
        affine, affine_inputs(), lambda dout, x, w, b: (dout @ w.T, x.T @ dout, dout.sum(0, keepdim=True)))
    assert report["db"].tier == "fail" and "shape [1, 3] vs [3]" in report["db"].note
    assert not report.passed


def test_backward_fn_returning_non_tensors_or_none():
    with pytest.raises(TypeError, match="backward_fn: gradient db is a list"):
        refnet.check_backward(affine, affine_inputs(),
                              lambda dout, x, w, b: (dout @ w.T, x.T @ dout, [0.0, 0.0, 0.0]))
    with pytest.raises(TypeError, match="backward_fn: returned float"):
        refnet.check_backward(affine, affine_inputs(), lambda dout, x, w, b: 0.0)
    report = refnet.check_backward(affine, affine_inputs(),
                                   lambda dout, x, w, b: (dout @ w.T, x.T @ dout, None))
    assert report["db"].tier == "fail" and "returned None" in report["db"].note


def test_check_backward_bad_arguments():
    x = affine_inputs()
    with pytest.raises(TypeError, match="inputs: expected a list"):
        refnet.check_backward(affine, x[0], affine_backward)
    with pytest.raises(ValueError, match="inputs: no floating-point tensor"):
        refnet.check_backward(lambda n: torch.ones(n), [3], lambda dout, n: ())
    with pytest.raises(ValueError, match="reference: with backward_fn=None"):
        refnet.check_backward(affine, x)
    with pytest.raises(ValueError, match=r"dout: expected shape \[4, 3\]"):
        refnet.check_backward(affine, x, affine_backward, dout=torch.ones(3))
    with pytest.raises(TypeError, match="fn: .* returned a tuple of 3"):
        refnet.check_backward(lambda x: (x, x, x), [x[0]], lambda dout, c: dout)
    with pytest.raises(ValueError, match="reference: the output of <lambda> does not depend"):
        refnet.check_backward(lambda x: x.detach() * 2, [x[0]], lambda dout, x: dout * 2)
    with pytest.raises(ValueError, match=r"wrt: inputs \[3\] are not floating-point tensors"):
        refnet.check_backward(lambda x, w, b, y: x @ w + b, [*x, torch.arange(4)],
                              lambda dout, x, w, b, y: dout, wrt=[0, 3])


def test_check_backward_dtype_mismatch_of_a_gradient_is_a_failure():
    report = refnet.check_backward(
        affine, affine_inputs(), lambda dout, x, w, b: (dout @ w.T, x.T @ dout, dout.sum(0).double()))
    assert report["db"].tier == "fail" and "dtype torch.float64 vs torch.float32" in report["db"].note


def test_cs231n_shape_with_a_cache_and_labels():
    def forward(x, y):
        return torch.nn.functional.cross_entropy(x, y), (x, y)

    def backward(dout, cache):
        x, y = cache
        p = x.softmax(1)
        p[torch.arange(x.shape[0]), y] -= 1
        return dout * p / x.shape[0]

    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    report = refnet.check_backward(forward, [x, torch.tensor([0, 3, 1, 1, 2])], backward, fd=True)
    assert [v.name for v in report] == ["dx"] and report.passed
    assert report.fd.passed and report.fd[0].name == "dx (finite differences)"


def test_finite_differences_catch_a_wrong_backward_even_when_autograd_is_not_the_reference():
    # reference and fn agree (both the forward), the backward is wrong: autograd and FD both say so
    report = refnet.check_backward(torch.sin, [torch.randn(6, dtype=torch.float64)],
                                   lambda dout, x: dout * x.cos() * 1.01, fd=True, names=["dx"])
    assert report["dx"].tier == "fail" and report.fd[0].tier == "fail" and not report.passed


def test_names_fall_back_to_input_positions_for_builtins():
    report = refnet.check_backward(torch.sin, [torch.randn(3, dtype=torch.float64)],
                                   lambda dout, x: dout * x.cos())
    assert [v.name for v in report] == ["dinput0"]
    with pytest.raises(ValueError, match="names: expected 1 names"):
        refnet.check_backward(torch.sin, [torch.randn(3)], lambda dout, x: dout, names=["a", "b"])


def test_finite_differences_accept_a_kink():
    x = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)   # relu's kink at 0
    report = refnet.check_backward(torch.relu, [x], lambda dout, x: torch.where(x > 0, dout, 0.0),
                                   fd=True, tier="bitwise")
    assert report.passed and "1 at a kink" in report.fd[0].note


def test_finite_differences_reject_a_wrong_value_at_a_kink():
    # relu at 0: the one-sided differences are 0 and dout; a backward that gives 5·dout there is
    # no subgradient, and check_backward's kink branch (no frozen pieces: any fn) must say so
    x = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    report = refnet.check_backward(
        torch.relu, [x], lambda dout, x: torch.where(x > 0, dout, 0.0) + 5 * dout * (x == 0),
        fd=True, dout=torch.ones(3, dtype=torch.float64), reference=torch.relu)
    fd = report.fd[0]
    assert not fd.passed and fd.mismatched == 1 and fd.worst_index == [1], fd.note
    assert "1 at a kink (0 accepted between" in fd.note and not report.passed


def test_a_report_whose_only_failure_is_finite_differences_fails():
    # x·x.detach(): autograd sees d/dx = x, and so does the hand-written backward (they agree,
    # bitwise); the function's true derivative is 2x, which only finite differences measure
    def square(x):
        return x * x.detach()

    x = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)
    report = refnet.check_backward(square, [x], lambda dout, x: dout * x, fd=True, tier="bitwise")
    assert report.forward.passed and all(v.passed and v.tier == "bitwise" for v in report)
    assert not report.fd.passed and report.fd[0].tier == "fail"
    assert not report.passed and not report
    with pytest.raises(AssertionError, match="dx \\(finite differences\\)"):
        report.assert_ok()


def test_assert_same_honours_a_stricter_tier_than_the_default():
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    up = torch.nextafter(x, x + 1)                 # 1 ulp: passes the default (tolerance)
    assert refnet.assert_same(up, x).tier == "ulp"
    assert refnet.assert_same(up, x, tier="ulp").tier == "ulp"
    with pytest.raises(AssertionError, match="required 'bitwise' or better"):
        refnet.assert_same(up, x, tier="bitwise")
    far = x * (1 + 1e-12)                          # tolerance: fails a required ulp
    assert refnet.assert_same(far, x).tier == "tolerance"
    with pytest.raises(AssertionError, match="required 'ulp' or better"):
        refnet.assert_same(far, x, tier="ulp")
    with pytest.raises(ValueError, match="tier: expected one of bitwise, ulp, tolerance"):
        refnet.assert_same(x, x, tier="exact")


# --- trace_compare ----------------------------------------------------------------------------
def test_trace_compare_names_the_first_departure_and_those_after():
    ref = {k: torch.full((2, 2), float(i)) for i, k in enumerate("abcde")}
    man = {k: v.clone() for k, v in ref.items()}
    man["c"] = man["c"] + 1
    man["e"] = man["e"] + 1
    trace = refnet.trace_compare(man, ref)
    assert trace.first_departure == "c" and not trace
    assert [v.name for v in trace.after] == ["d", "e"]
    assert "first departure at #3 of 5: 'c'" in str(trace) and "e fail" in str(trace)
    with pytest.raises(AssertionError, match="first departure at #3"):
        trace.assert_ok()
    assert refnet.trace_compare(ref, ref).passed


def test_trace_compare_bad_input():
    with pytest.raises(ValueError, match=r"reference: no tensor for \['b'\]"):
        refnet.trace_compare({"a": torch.ones(1), "b": torch.ones(1)}, {"a": torch.ones(1)})
    with pytest.raises(TypeError, match="manual: expected a dict"):
        refnet.trace_compare([torch.ones(1)], {})
    with pytest.raises(ValueError, match="manual: expected at least one"):
        refnet.trace_compare({}, {})
    with pytest.raises(TypeError, match="actual: expected a torch.Tensor for 'a'"):
        refnet.trace_compare({"a": 1.0}, {"a": torch.ones(1)})


# --- check_training: rounds differently vs wrong gradient -------------------------------------
def _xor32(steps):
    spec = examples.get("xor").build_spec("float32")
    return refnet.Spec.from_dict({**spec.to_dict(), "steps": steps})


def test_training_identical_for_refnets_own_backward():
    result = refnet.check_training(_xor32(60), check_every=20)
    assert result.verdict == "identical" and result.passed
    assert [s for s, _ in result.grad_checks] == [0, 20, 40, 59]


def test_training_rounds_differently_is_not_a_wrong_gradient(monkeypatch):
    fwd, _, opts = acts.ACTIVATIONS["tanh"]
    # tanh' as dy·(1 − y·y): two roundings where PyTorch's kernel fuses one
    monkeypatch.setitem(acts.ACTIVATIONS, "tanh", (fwd, lambda dy, y: dy * (1 - y * y), opts))
    result = refnet.check_training(_xor32(300), check_every=50)
    assert result.verdict == "rounds differently" and result.passed, result.message
    assert result.curve.first_divergence is not None and result.curve.tier != "bitwise"
    assert all(r.passed for _, r in result.grad_checks)
    assert {r.tier for _, r in result.grad_checks} <= {"bitwise", "ulp", "tolerance"}
    assert "not a wrong gradient" in result.message and "part at step" in result.message
    # the relative loss difference grows from 0 at step 0 over the run
    rel = [g[2] for g in result.growth]
    assert rel[0] == 0 and max(rel) > 1e-6


def test_training_wrong_gradient_fails_at_step_0(monkeypatch):
    fwd, bwd, opts = acts.ACTIVATIONS["tanh"]
    monkeypatch.setitem(acts.ACTIVATIONS, "tanh", (fwd, lambda dy, y: bwd(dy, y) * 1.01, opts))
    result = refnet.check_training(_xor32(50), check_every=25)
    assert result.verdict == "wrong gradient" and not result.passed and not result
    assert result.message.startswith("wrong gradient: at step 0 ")
    assert "worst at index" in result.message


def test_check_training_bad_arguments():
    with pytest.raises(ValueError, match="check_every: expected an integer >= 1"):
        refnet.check_training(_xor32(5), check_every=0)
    with pytest.raises(ValueError, match="steps: expected an integer >= 1"):
        refnet.check_training(_xor32(5), steps=-1)


# --- one default activation -------------------------------------------------------------------
def test_one_default_activation_everywhere():
    import inspect
    from manual.mlp import MLP, init_params
    spec_default = refnet.Spec(sizes=[2, 3, 1]).activation
    defaults = {inspect.signature(f).parameters["activation"].default
                for f in (MLP.__init__, init_params, refnet.Twin.__init__)}
    assert defaults == {spec_default} == {"sigmoid"}


def test_docstring_examples_run():
    import doctest
    import refnet.api
    import refnet.backward_check
    import refnet.training_check
    import refnet.twin
    for module in (refnet.api, refnet.backward_check, refnet.training_check, refnet.twin):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
def test_training_check_builds_the_specs_own_net(norm):
    """The scratch twin has the spec's norm layers, and the gradient check at a step leaves the
    manual running statistics where training put them (the curves stay bitwise)."""
    spec = refnet.Spec.from_dict({"sizes": [2, 6, 3], "activation": "relu", "norm": norm,
                                  "loss": "cross_entropy", "data": "spiral", "n_samples": 30,
                                  "batch_size": 10, "steps": 12,
                                  "optimizer": {"name": "sgd", "lr": 0.1}})
    result = refnet.check_training(spec, check_every=4)
    assert result.verdict == "identical" and result.passed, result.message
    assert [s for s, _ in result.grad_checks] == [0, 4, 8, 11]


def test_training_check_refuses_dropout():
    spec = refnet.Spec.from_dict({"sizes": [2, 6, 1], "dropout": 0.2, "data": "xor", "steps": 4})
    with pytest.raises(ValueError, match="check_training does not support dropout"):
        refnet.check_training(spec)


# --- issue 22: the check API as users meet it ------------------------------------------------
def test_fd_sides_with_the_backward_when_the_reference_is_imprecise():
    # PyTorch's float64 hardsigmoid gradient is a float32 1/6; an exact 1/6 misses float64's
    # tolerance against it, and finite differences say the backward is the closer one
    x = torch.linspace(-4, 4, 13, dtype=torch.float64) + 0.05
    report = refnet.check_backward(
        torch.nn.functional.hardsigmoid, [x],
        lambda dout, x: torch.where((x > -3) & (x < 3), dout / 6, torch.zeros_like(dout)), fd=True)
    assert not report.passed and report.fd.passed
    assert "finite differences side with the backward under test" in report["dinput"].note
    # a backward that is simply wrong gets no such note
    wrong = refnet.check_backward(torch.sin, [x], lambda dout, x: dout * x.cos() * 1.01, fd=True)
    assert "side with" not in wrong[0].note


def test_fd_for_an_autograd_function_and_a_float32_hint():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, dout):
            (x,) = ctx.saved_tensors
            return 3 * dout * x                            # wrong: 3x, not 2x

    x = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    report = refnet.check_backward(Square.apply, [x], reference=lambda x: x * x, fd=True)
    assert report.fd is not None and not report.fd.passed and not report.passed
    report = refnet.check_backward(lambda x: (x * 2).float(), [x.float()], lambda dout, x: 2 * dout,
                                   fd=True)
    assert not report.fd.passed and "needs fn to compute in its inputs' dtype" in report.fd[0].note


def test_failures_are_verdicts_and_describe_takes_them():
    report = refnet.check_backward(affine, affine_inputs(),
                                   lambda dout, x, w, b: (dout @ w.T, x.T @ dout * 2, dout.sum(0)))
    failures = report.failures()
    assert [type(v).__name__ for v in failures] == ["Verdict"] and failures[0].name == "dw"
    assert "dw is 'fail'" in refnet.describe(failures[0], report.required)


def test_two_outputs_are_not_silently_read_as_out_and_cache():
    x = affine_inputs()[0]
    with pytest.raises(TypeError, match="returned two arrays: pass returns='out_cache'"):
        refnet.check_backward(lambda x: (x.exp(), x), [x], lambda dout, x: dout)
    # said explicitly, or by a backward that reads (dout, cache): CS231n's shape
    assert refnet.check_backward(lambda x: (x.exp(), x), [x], lambda dout, x: dout * x.exp(),
                                 returns="out_cache").passed
    assert refnet.check_backward(lambda x: (x.exp(), x), [x],
                                 lambda dout, cache: dout * cache.exp()).passed
    with pytest.raises(ValueError, match="returns: expected one of out, out_cache"):
        refnet.check_backward(affine, affine_inputs(), affine_backward, returns="cache")


def test_gradients_by_position_and_numpy_without_a_reference():
    report = refnet.check_backward(torch.nn.functional.silu, [affine_inputs()[0]],
                                   lambda dout, x: dout * torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))))
    assert report[0] is report["dinput"]
    with pytest.raises(ValueError, match="reference: NumPy inputs"):
        refnet.check_backward(lambda x: x, [affine_inputs()[0].numpy()], lambda dout, x: dout)


def test_refnet_frames_are_hidden_from_pytest_tracebacks():
    import inspect
    for fn in (refnet.assert_same, refnet.check_backward, refnet.Report.assert_ok):
        assert "__tracebackhide__ = True" in inspect.getsource(fn)
