"""The paper's Zephyr setting (docs/method.md): zephyr-7b-beta as pi_theta(0),
mistral-7b-sft-beta as pi_ref(0), UltraFeedback 10k prompts, K=16, T=0.7, top-p 0.9,
beta 0.1, gamma 0.5, 2 rounds of 300 steps x batch 32 at lr 5e-7. Needs network (hub) and
GPUs/TPUs: 8 x 80 GB is the paper's budget; see the README section "The paper's settings on
GPUs / TPUs"."""

from dice_jax.config import RunConfig


def get_config():
    c = RunConfig()
    c.run_dir = "runs/zephyr"
    c.model.policy = "HuggingFaceH4/zephyr-7b-beta"
    c.model.reference = "HuggingFaceH4/mistral-7b-sft-beta"
    c.model.chat_template = "zephyr"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.data.offline = "HuggingFaceH4/ultrafeedback_binarized"
    c.data.offline_split = "train_prefs"
    c.data.max_prompts = 10000
    c.sampling.temperature = 0.7
    c.sampling.top_p = 0.9
    c.dice.gamma = 0.5
    return c
