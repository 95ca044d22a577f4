"""llmstages: the training stages of a language model as LightningModules.

Pretraining, supervised fine-tuning, reward modelling, DPO and GRPO share one
Transformer backbone (`llmstages.model`) and one masking/loss module
(`llmstages.losses`; GRPO's own loss maths in `llmstages.stages.grpo.loss`). Every choice that changes which token carries a loss or
how a loss is normalised is a named, tested option.
"""

__version__ = "0.1.0"

from llmstages import noise as _noise  # noqa: E402

_noise.install()  # Lightning's cloud advertisements, on every Trainer (llmstages.noise)
