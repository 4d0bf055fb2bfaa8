"""The serving engine: requests, scheduler, KV page manager, model runner, sampler and LLMEngine.step()."""
