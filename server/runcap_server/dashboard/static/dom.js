// Tiny DOM helpers: elements from a tag, attributes and children. No framework.
function fill(element, attrs, children) {
    for (const [name, value] of Object.entries(attrs ?? {})) {
        if (value === null || value === undefined || value === false)
            continue;
        element.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
        if (child === null || child === undefined || child === false)
            continue;
        element.append(child instanceof Node ? child : String(child));
    }
}
/** An HTML element. */
export function h(tag, attrs = null, ...children) {
    const element = document.createElement(tag);
    fill(element, attrs, children);
    return element;
}
const SVG_NS = "http://www.w3.org/2000/svg";
/** An SVG element (attributes, never inline styles: the page's CSP forbids them). */
export function s(tag, attrs = null, ...children) {
    const element = document.createElementNS(SVG_NS, tag);
    fill(element, attrs, children);
    return element;
}
/** Replaces an element's children. */
export function replace(element, ...children) {
    element.replaceChildren();
    fill(element, null, children);
}
