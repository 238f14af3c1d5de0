"""Combiners: the linear mixture against the direct formula, and user code."""

import math
import textwrap

import pytest
import torch

from memdec_combiners.linear import Linear
from memdec_core.components.combiner_files import resolve_combiner
from memdec_core.errors import ConfigError, UnknownComponentError
from memdec_core.interfaces import Combiner, combiner


def random_logprobs(rows, vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(rows, vocab, generator=generator) * 3, dim=-1)


@pytest.mark.parametrize("lam", [0.0, 0.05, 0.25, 0.5, 0.9, 1.0])
def test_log_space_interpolation_equals_direct_mix(lam):
    base, memory = random_logprobs(6, 50, 0), random_logprobs(6, 50, 1)
    mixed = Linear(lam=lam).combine(base, memory, {})
    direct = torch.log((1 - lam) * base.double().exp() + lam * memory.double().exp())
    assert torch.allclose(mixed.double(), direct, atol=1e-5)
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(6), atol=1e-5)


def test_memory_zeros_stay_finite():
    base = random_logprobs(2, 5, 0)
    memory = torch.full((2, 5), float("-inf"))
    memory[:, 0] = 0.0
    mixed = Linear(lam=0.3).combine(base, memory, {})
    assert torch.isfinite(mixed).all()
    assert math.isclose(float(mixed[0, 1]), float(base[0, 1]) + math.log(0.7), rel_tol=1e-6)


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_lambda_outside_unit_interval(lam):
    with pytest.raises(ConfigError, match=r"lam must be in \[0, 1\]|lam must be a finite number"):
        Linear(lam=lam)


def test_unknown_setting():
    with pytest.raises(ConfigError, match="unknown setting"):
        Linear(lamda=0.3)


def write(tmp_path, name, source):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


ONE = """
    from dataclasses import dataclass
    from memdec_core.interfaces import Combiner

    class Max(Combiner):
        '''Elementwise max, renormalised.'''
        name = "max"

        @dataclass
        class Config:
            pass

        def combine(self, base, memory, context):
            mixed = base.maximum(memory)
            return mixed - mixed.logsumexp(-1, keepdim=True)
"""


def test_combiner_file_with_one_candidate(tmp_path):
    path = write(tmp_path, "one.py", ONE)
    cls = resolve_combiner(str(path))
    assert cls.name == "max" and issubclass(cls, Combiner)
    assert resolve_combiner(f"{path}:Max").__name__ == "Max"  # by class name
    assert resolve_combiner(f"{path}:max").__name__ == "Max"  # by component name


def test_combiner_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve_combiner(str(tmp_path / "missing.py"))
    empty = write(tmp_path, "empty.py", "x = 1\n")
    with pytest.raises(ConfigError, match="defines 0 combiners"):
        resolve_combiner(str(empty))
    two = write(tmp_path, "two.py", ONE + "\n    class Other(Max):\n        name = 'other'\n")
    with pytest.raises(ConfigError, match="defines 2 combiners .*name one"):
        resolve_combiner(str(two))
    with pytest.raises(UnknownComponentError, match="did you mean 'Max'"):
        resolve_combiner(f"{two}:Mx")
    broken = write(tmp_path, "broken.py", "import no_such_module_xyz\n")
    with pytest.raises(ConfigError, match="cannot import combiner file"):
        resolve_combiner(str(broken))
    with pytest.raises(UnknownComponentError, match="did you mean 'linear'"):
        resolve_combiner("linearr")


def test_decorated_function_combiner():
    @combiner("geometric", grid=[{"alpha": 0.1}, {"alpha": 0.3}])
    def geometric(base, memory, context, alpha=0.2):
        mixed = (1 - alpha) * base + alpha * memory
        return mixed - mixed.logsumexp(-1, keepdim=True)

    assert [config.alpha for config in geometric.grid()] == [0.1, 0.3]
    out = geometric(alpha=0.3).combine(random_logprobs(2, 7, 0), random_logprobs(2, 7, 1), {})
    assert torch.allclose(out.exp().sum(-1), torch.ones(2), atol=1e-5)


def test_an_instance_fixes_its_knobs():
    fixed = resolve_combiner(Linear(lam=0.42))
    assert [config.lam for config in fixed.grid()] == [0.42]
    assert resolve_combiner(Linear) is Linear
