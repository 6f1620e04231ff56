// What the inline SVG charts share: scales, axis ticks and colours.
/** Colours that stay distinct for the common colour-vision deficiencies (Okabe-Ito). */
export const PALETTE = [
    "#0072b2",
    "#e69f00",
    "#009e73",
    "#d55e00",
    "#cc79a7",
    "#56b4e9",
    "#8c6d00",
    "#333333",
];
export function colour(index) {
    return PALETTE[index % PALETTE.length];
}
/** A linear map from [d0, d1] to [r0, r1]. */
export function scale(d0, d1, r0, r1) {
    const span = d1 - d0 || 1;
    return (value) => r0 + ((value - d0) * (r1 - r0)) / span;
}
/** About `count` round tick values from 0 to at least `max` (1, 2 or 5 times a power of ten). */
export function niceTicks(max, count = 4) {
    if (max <= 0)
        return [0];
    const rough = max / count;
    const power = 10 ** Math.floor(Math.log10(rough));
    const step = [1, 2, 5, 10].map((m) => m * power).find((candidate) => candidate >= rough);
    const ticks = [];
    for (let value = 0; value < max + step; value += step)
        ticks.push(value);
    return ticks;
}
