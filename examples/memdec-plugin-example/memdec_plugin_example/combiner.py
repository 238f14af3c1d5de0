"""``product``: a product of experts, (1−α)·log p_base + α·log p_memory, renormalised."""

from dataclasses import dataclass

from memdec_core.interfaces import Combiner, setting


class Product(Combiner):
    """Product of experts: (1−α)·log p_base + α·log p_memory, renormalised."""

    name = "product"
    elementwise = False  # the renormalisation needs whole rows

    @dataclass
    class Config:
        alpha: float = setting(0.2, "α, the memory's exponent; tuned on validation unless fixed")

    @classmethod
    def grid(cls):
        return [cls.Config(alpha) for alpha in (0.05, 0.1, 0.2, 0.3)]

    def combine(self, base_logprobs, memory_logprobs, context):
        alpha = self.config.alpha
        # Where the memory gives a token no mass (-inf), keep the base's opinion of it.
        memory = memory_logprobs.clamp(min=-30.0)
        mixed = (1 - alpha) * base_logprobs + alpha * memory
        return mixed - mixed.logsumexp(dim=-1, keepdim=True)
