// Money and time for people. Money arrives as integer micro-USD (exact in a JS
// number up to 2^53 - 1, the API's maximum) and is formatted with integers only.
const MICROS_PER_USD = 1_000_000;
/** `$1.20`, `$0.000123`, `-$3.00`, `$1,234.50`: 2 to 6 decimals, as the CLI prints. */
export function usd(micros) {
    const sign = micros < 0 ? "-" : "";
    const abs = Math.abs(Math.trunc(micros));
    const dollars = Math.floor(abs / MICROS_PER_USD);
    let fraction = String(abs % MICROS_PER_USD).padStart(6, "0").replace(/0+$/, "");
    fraction = fraction.padEnd(2, "0");
    return `${sign}$${dollars.toLocaleString("en-US")}.${fraction}`;
}
/** Whole cents for axes and charts: `$12.35`, `$1.2k`, `$3.4M`. */
export function usdShort(micros) {
    const dollars = micros / MICROS_PER_USD;
    const abs = Math.abs(dollars);
    if (abs >= 1e6)
        return `$${(dollars / 1e6).toFixed(1)}M`;
    if (abs >= 1e4)
        return `$${(dollars / 1e3).toFixed(1)}k`;
    if (abs >= 1 || abs === 0)
        return `$${dollars.toFixed(2)}`;
    return `$${dollars.toPrecision(2)}`;
}
/** Spend as a whole percentage of a limit. */
export function percent(part, whole) {
    return whole > 0 ? Math.floor((part * 100) / whole) : 0;
}
export function clock(ms) {
    return new Date(ms).toLocaleTimeString("en-GB", { hour12: false });
}
export function dateTime(ms) {
    const when = new Date(ms);
    return `${when.toISOString().slice(0, 10)} ${clock(ms)}`;
}
export function tokens(count) {
    return count.toLocaleString("en-US");
}
