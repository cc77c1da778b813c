"""ddpm_fashion/training/model_card.py: the model card's account of the training time over sessions."""


def test_model_card_training_time_over_sessions():
    from ddpm_fashion.training.model_card import describe_training_time

    assert describe_training_time(5615.4, 3535.2) == "5615 s over all sessions (3535 s in the last)"
    assert describe_training_time(120.2, 120.2) == "120 s"
    assert describe_training_time(None, 3535.2) == "3535 s in the last session (earlier sessions did not record theirs)"
