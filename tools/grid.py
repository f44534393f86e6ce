"""
grid.py: sample grids as PNG pictures (train_cifar.py's samples_<step>.png, tools/sample.py).
"""


def save_grid(x, path, names=None, nrow=10):
    """Samples in [-1, 1] (3 channels) -> a PNG grid; with names, one column per class, enlarged, its name on top."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid
    nrow = len(names) if names else nrow
    grid = make_grid((x[:, :3].float().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1)
    img = Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).cpu().numpy())
    if names:
        cell = x.shape[-1] + 2
        zoom = max(1, -(-64 // cell))                                  # columns at least 64 px wide, for the names
        img = img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)
        framed = Image.new("RGB", (img.width, img.height + 14), "white")
        framed.paste(img, (0, 14))
        draw = ImageDraw.Draw(framed)
        try:
            font = ImageFont.load_default(size=12)                     # Pillow >= 10.1: spaces wide enough to see
        except TypeError:
            font = ImageFont.load_default()
        for k, name in enumerate(names):
            name = str(name)
            while draw.textlength(name, font=font) > cell * zoom - 2:     # cut names wider than their column
                name = name[:-1]
            left = k * cell * zoom + (cell * zoom - draw.textlength(name, font=font)) / 2   # centred in its column
            draw.text((left, 1), name, fill="black", font=font)
        img = framed
    img.save(path)
