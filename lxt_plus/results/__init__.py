"""Result types (explanations, generation explanations, targets), their JSON codec and word grouping."""
