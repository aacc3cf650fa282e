"""GFlowNet building blocks: losses, environments, policies, preferences and the replay buffer."""
