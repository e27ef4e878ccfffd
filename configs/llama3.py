"""The paper's Llama-3 setting (docs/method.md): princeton-nlp Llama-3-Base-8B-SFT-DPO as
pi_theta(0), Llama-3-Base-8B-SFT as pi_ref(0), T=0.9, top-p 1.0, gamma 0.5 as in the
official script (the paper's appendix sweep prefers 0.1: --config.dice.gamma=0.1)."""

from dice_jax.config import RunConfig


def get_config():
    c = RunConfig()
    c.run_dir = "runs/llama3"
    c.model.policy = "princeton-nlp/Llama-3-Base-8B-SFT-DPO"
    c.model.reference = "princeton-nlp/Llama-3-Base-8B-SFT"
    c.model.chat_template = "llama3_no_system"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.data.offline = "HuggingFaceH4/ultrafeedback_binarized"
    c.data.offline_split = "train_prefs"
    c.data.max_prompts = 10000
    c.sampling.temperature = 0.9
    c.sampling.top_p = 1.0
    c.dice.gamma = 0.5
    return c
