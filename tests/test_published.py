from cxr_lib.published import published_chestxray14


def test_published_table_holds_the_papers_headline_numbers():
    table = published_chestxray14()
    xiao = table[table["source"] == "Xiao et al. 2023"].set_index(["model", "pre-training"])
    assert xiao.loc[("ViT-S/16", "X-ray MAE"), "mean AUC (%)"] == 82.3
    assert xiao.loc[("DenseNet-121", "X-ray MoCo v2"), "mean AUC (%)"] == 80.6
    assert len(table) == 8 and table["mean AUC (%)"].between(70, 90).all()
