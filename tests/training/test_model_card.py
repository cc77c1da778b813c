"""ddpm_fashion/training/model_card.py: the model card's account of the training time over sessions."""


def test_model_card_training_time_over_sessions():
    from ddpm_fashion.training.model_card import describe_training_time

    assert describe_training_time(5615.4, 3535.2) == "5615 s over all sessions (3535 s in the last)"
    assert describe_training_time(120.2, 120.2) == "120 s"
    assert describe_training_time(None, 3535.2) == "3535 s in the last session (earlier sessions did not record theirs)"


def write_card(tmp_path, **data_options):
    """Write a model card for a config with these data options; get its text and its parsed metadata."""
    from huggingface_hub import ModelCard

    from ddpm_fashion.training.config import TrainConfig
    from ddpm_fashion.training.model_card import write_model_card

    unet = {"sample_size": 64, "in_channels": 3, "out_channels": 3} if data_options else None
    config = TrainConfig(**data_options, **({"unet": unet} if unet else {}))
    path = tmp_path / "README.md"
    write_model_card(path, config=config, config_yaml="seed: 0\n", steps=3, images_seen=48, losses=[0.5],
                     train_seconds=1.0, session_seconds=1.0, world_size=1)
    return path.read_text(), ModelCard.load(path).data.to_dict()


def test_model_card_names_fashion_mnist_and_links_its_hub_dataset(tmp_path):
    text, metadata = write_card(tmp_path)
    assert "# DDPM trained on FashionMNIST" in text and "28×28 grey, padded to 32×32" in text
    assert metadata["datasets"] == ["zalando-datasets/fashion_mnist"] and "fashion-mnist" in metadata["tags"]


def test_model_card_of_an_image_folder_names_the_folder_and_claims_no_dataset(tmp_path):
    folder = tmp_path / "my-flowers"
    folder.mkdir()
    text, metadata = write_card(tmp_path, train_data_dir=str(folder))
    assert "# DDPM trained on my-flowers" in text and "resized to 64×64 RGB" in text
    assert "FashionMNIST" not in text and "datasets" not in metadata and "fashion-mnist" not in metadata["tags"]


def test_model_card_of_a_hub_dataset_links_it(tmp_path):
    text, metadata = write_card(tmp_path, dataset_name="huggan/flowers-102-categories")
    assert "# DDPM trained on huggan/flowers-102-categories" in text and "FashionMNIST" not in text
    assert metadata["datasets"] == ["huggan/flowers-102-categories"]
